"""Data sets held as tensors, their cache, and the models built for them."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from clrsearch.spec import TORCHVISION_MODELS, TaskSpec
from worker.data import DatasetCache, DatasetUnavailable, prepare_data
from worker.models import build_model


@pytest.fixture
def offline(monkeypatch):
    """No network: any download fails at once, as on an offline worker."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# Data sets


def test_cache_returns_the_same_object_the_second_time(tmp_path: Path):
    cache = DatasetCache(tmp_path)

    first = cache.get(TaskSpec())

    assert cache.get(TaskSpec(model="mlp", epochs=3)) is first
    assert cache.get(TaskSpec(seed=1)) is not first


def test_cache_drops_the_least_recently_used_data_set(tmp_path: Path):
    cache = DatasetCache(tmp_path, max_entries=2)
    kept = cache.get(TaskSpec(dataset="fake", fake_size=16))
    dropped = cache.get(TaskSpec(dataset="fake", fake_size=16, seed=1))
    cache.get(TaskSpec(dataset="fake", fake_size=16))
    cache.get(TaskSpec(dataset="fake", fake_size=16, seed=2))

    assert cache.get(TaskSpec(dataset="fake", fake_size=16)) is kept
    assert cache.get(TaskSpec(dataset="fake", fake_size=16, seed=1)) is not dropped


def test_digits_are_split_and_normalised_with_training_statistics(tmp_path: Path):
    data = prepare_data(TaskSpec(val_fraction=0.25), tmp_path)

    assert (data.in_channels, data.image_size, data.num_classes) == (1, 8, 10)
    assert data.train_x.shape[1:] == (1, 8, 8)
    assert len(data.train_y) + len(data.val_y) == 1797
    assert len(data.val_y) == round(1797 * 0.25)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(float(data.train_x.mean())) < 1e-5
    assert float(data.train_x.std()) == pytest.approx(1.0, abs=1e-4)


def test_split_depends_only_on_the_seed(tmp_path: Path):
    first = prepare_data(TaskSpec(seed=3), tmp_path)
    again = prepare_data(TaskSpec(seed=3), tmp_path)
    other = prepare_data(TaskSpec(seed=4), tmp_path)

    assert torch.equal(first.val_y, again.val_y) and torch.equal(first.val_x, again.val_x)
    assert not torch.equal(first.val_y, other.val_y)


def test_fake_data_is_one_channel_16px_and_deterministic(tmp_path: Path):
    task = TaskSpec(dataset="fake", fake_size=64)
    data = prepare_data(task, tmp_path)
    again = prepare_data(task, tmp_path)

    assert data.train_x.shape == (51, 1, 16, 16)
    assert data.val_x.shape == (13, 1, 16, 16)
    assert (data.in_channels, data.image_size, data.num_classes) == (1, 16, 10)
    assert torch.equal(data.train_x, again.train_x)


def test_image_size_resizes_fake_and_digits(tmp_path: Path):
    fake = prepare_data(TaskSpec(dataset="fake", fake_size=16, image_size=12), tmp_path)
    digits = prepare_data(TaskSpec(image_size=16), tmp_path)

    assert fake.train_x.shape[1:] == (1, 12, 12)
    assert (digits.image_size, digits.train_x.shape[-1]) == (16, 16)


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [("cifar10", ""), ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")],
)
def test_offline_download_names_the_folder_to_fill(tmp_path: Path, offline, dataset, folder):
    with pytest.raises(DatasetUnavailable) as caught:
        prepare_data(TaskSpec(dataset=dataset), tmp_path)

    message = str(caught.value)
    assert dataset in message
    assert "download" in message
    assert f"folder {(tmp_path / folder).resolve()}" in message


def test_imagefolder_missing_path_names_the_path(tmp_path: Path):
    missing = tmp_path / "no-such-folder"

    with pytest.raises(DatasetUnavailable, match=str(missing)):
        prepare_data(TaskSpec(dataset="imagefolder", data_path=str(missing)), tmp_path)


def test_imagefolder_without_class_folders_names_the_path(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DatasetUnavailable, match=str(empty)):
        prepare_data(TaskSpec(dataset="imagefolder", data_path=str(empty)), tmp_path)


def _write_image_folder(root: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for index in range(5):
            pixels = torch.randint(0, 256, (10, 12, 3), generator=generator, dtype=torch.uint8)
            pixels[..., label] = 255
            Image.fromarray(pixels.numpy()).save(root / name / f"{index}.png")


def test_imagefolder_loads_pngs_resized_to_32px(tmp_path: Path):
    root = tmp_path / "images"
    _write_image_folder(root)

    data = prepare_data(TaskSpec(dataset="imagefolder", data_path=str(root)), tmp_path)
    small = prepare_data(
        TaskSpec(dataset="imagefolder", data_path=str(root), image_size=16), tmp_path
    )

    assert (data.in_channels, data.image_size, data.num_classes) == (3, 32, 2)
    assert data.train_x.shape == (8, 3, 32, 32) and data.val_x.shape == (2, 3, 32, 32)
    assert small.train_x.shape[1:] == (3, 16, 16)


def test_moving_to_the_same_device_costs_nothing(tmp_path: Path):
    data = prepare_data(TaskSpec(dataset="fake", fake_size=16), tmp_path)

    assert data.to(torch.device("cpu")) is data


# Models


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet18", "mobilenet_v3_small"])
def test_model_gives_logits_for_one_channel_8px_images(name, offline):
    model = build_model(name, in_channels=1, image_size=8, num_classes=10)

    logits = model(torch.randn(2, 1, 8, 8))
    logits.sum().backward()

    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in TORCHVISION_MODELS if n != "resnet18"])
def test_every_listed_torchvision_model_adapts_to_small_grey_images(name, offline):
    model = build_model(name, in_channels=1, image_size=12, num_classes=4).eval()

    with torch.no_grad():
        assert model(torch.randn(2, 1, 12, 12)).shape == (2, 4)


def test_three_channel_32px_torchvision_model_is_unchanged_but_for_its_head(offline):
    model = build_model("resnet18", in_channels=3, image_size=32, num_classes=7)

    assert not any(isinstance(module, nn.Upsample) for module in model.modules())
    assert model.conv1.in_channels == 3
    assert model.fc.out_features == 7


def test_cnn_handles_larger_color_images():
    model = build_model("cnn", in_channels=3, image_size=32, num_classes=5)

    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_unknown_model_error_names_it_and_the_known_models():
    with pytest.raises(ValueError, match="'resnet9'.*cnn, mlp, resnet18"):
        build_model("resnet9", in_channels=1, image_size=8, num_classes=10)
