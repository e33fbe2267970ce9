"""Data sets, loaded once per worker and held in memory as tensors.

| dataset         | source                                   | images (classes)   |
|-----------------|------------------------------------------|--------------------|
| `digits`        | scikit-learn, bundled (the default)      | 1 x 8 x 8 (10)     |
| `fake`          | torchvision `FakeData`, deterministic    | 1 x 16 x 16 (10)   |
| `mnist`         | torchvision, downloaded into `data_dir`  | 1 x 28 x 28 (10)   |
| `fashion_mnist` | torchvision, downloaded into `data_dir`  | 1 x 28 x 28 (10)   |
| `cifar10`       | torchvision, downloaded into `data_dir`  | 3 x 32 x 32 (10)   |
| `imagefolder`   | torchvision `ImageFolder` at `data_path` | 3 x 32 x 32 (any)  |

`task.image_size` resizes any of them (`imagefolder` defaults to 32). Only the
training part of the torchvision sets is used; it is split into training and
validation with `task.seed` and `task.val_fraction`, and normalised per channel with
the training part's statistics.

Errors: `DatasetUnavailable` (a `RuntimeError`) when a data set cannot be had on this
worker, a failed download or a missing folder; its message names the folder to fill.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clrsearch.spec import TaskSpec

logger = logging.getLogger(__name__)

FAKE_IMAGE_SIZE = 16
IMAGEFOLDER_IMAGE_SIZE = 32
FAKE_NUM_CLASSES = 10
# Images resized at a time: bounds the float copy made while resizing a large set.
RESIZE_CHUNK = 4096

# What to put where when a worker cannot download: torchvision's layout under data_dir.
# torchvision checks for the test files too, although only the training part is used.
_MNIST_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz (or the same files unpacked)"
)
_DOWNLOAD_LAYOUT = {
    "mnist": (
        "MNIST/raw",
        f"{_MNIST_FILES} from https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
    "fashion_mnist": (
        "FashionMNIST/raw",
        f"{_MNIST_FILES} from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "cifar10": (
        ".",
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/ "
        "(or its unpacked cifar-10-batches-py folder)",
    ),
}


class DatasetUnavailable(RuntimeError):
    """The data set cannot be had on this worker: a download failed or a folder is missing.

    Another worker, or this one once the files are in place, may succeed.
    """


@dataclass
class PreparedData:
    """A data set split into training and validation tensors, normalised, ready to train.

    Images are float32 `(N, C, H, W)`, labels int64 `(N,)`.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    in_channels: int
    image_size: int
    num_classes: int
    # Copies already moved to an accelerator, so that later trials reuse them.
    _copies: dict[str, PreparedData] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def to(self, device: torch.device) -> PreparedData:
        """These tensors on `device`; the copy is made once and kept with this object."""
        if self.train_x.device == device:
            return self
        key = str(device)
        if key not in self._copies:
            self._copies[key] = PreparedData(
                train_x=self.train_x.to(device),
                train_y=self.train_y.to(device),
                val_x=self.val_x.to(device),
                val_y=self.val_y.to(device),
                in_channels=self.in_channels,
                image_size=self.image_size,
                num_classes=self.num_classes,
            )
        return self._copies[key]


CacheKey = tuple[str, str | None, float, int, int, int | None]


class DatasetCache:
    """Prepared data sets of this worker, kept so that the next trial on the same data
    starts at once.

    Entries are keyed by everything that changes the tensors; the least recently used
    is dropped beyond `max_entries` so that a worker serving many studies does not grow
    without bound.
    """

    def __init__(self, data_dir: Path, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.data_dir = Path(data_dir)
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, PreparedData] = OrderedDict()
        # Held while loading, so two threads asking for one data set load it once.
        self._lock = threading.Lock()

    @staticmethod
    def key(task: TaskSpec) -> CacheKey:
        return (
            task.dataset,
            task.data_path,
            task.val_fraction,
            task.seed,
            task.fake_size,
            task.image_size,
        )

    def get(self, task: TaskSpec) -> PreparedData:
        key = self.key(task)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            data = prepare_data(task, self.data_dir)
            self._entries[key] = data
            while len(self._entries) > self.max_entries:
                dropped, _ = self._entries.popitem(last=False)
                logger.info("dropped data set %s from the cache", dropped[0])
            return data


def prepare_data(task: TaskSpec, data_dir: Path) -> PreparedData:
    """Load `task.dataset`, resize, split and normalise it."""
    images, labels, num_classes = _load(task, Path(data_dir))

    if task.image_size is not None and images.shape[-1] != task.image_size:
        images = _resize(images, task.image_size)

    train_x, train_y, val_x, val_y = _split(images, labels, task.val_fraction, task.seed)

    # Training statistics only, so that nothing of the validation part leaks in.
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    train_x = (train_x - mean) / std
    val_x = (val_x - mean) / std

    logger.info(
        "prepared data set %s: %d training and %d validation images of %s, %d classes",
        task.dataset,
        len(train_y),
        len(val_y),
        "x".join(str(n) for n in images.shape[1:]),
        num_classes,
    )
    return PreparedData(
        train_x=train_x.contiguous(),
        train_y=train_y,
        val_x=val_x.contiguous(),
        val_y=val_y,
        in_channels=images.shape[1],
        image_size=images.shape[-1],
        num_classes=num_classes,
    )


def _load(task: TaskSpec, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Images as float32 `(N, C, H, W)` in [0, 1], labels int64, and the class count."""
    if task.dataset == "digits":
        return _load_digits()
    if task.dataset == "fake":
        return _load_fake(task.fake_size, task.image_size or FAKE_IMAGE_SIZE)
    if task.dataset in _DOWNLOAD_LAYOUT:
        return _load_torchvision(task.dataset, data_dir)
    if task.dataset == "imagefolder":
        if not task.data_path:
            raise ValueError("dataset imagefolder needs data_path, a folder on the workers")
        return _load_imagefolder(Path(task.data_path), task.image_size or IMAGEFOLDER_IMAGE_SIZE)
    raise ValueError(f"unknown dataset {task.dataset!r}")


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts from 0 to 16.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return images, labels, 10


def _load_fake(size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    from torchvision.datasets import FakeData
    from torchvision.transforms import PILToTensor

    # FakeData seeds each image from its index, so the set is the same every time.
    dataset = FakeData(
        size=size,
        image_size=(1, image_size, image_size),
        num_classes=FAKE_NUM_CLASSES,
        transform=PILToTensor(),
    )
    pairs = [dataset[index] for index in range(len(dataset))]
    images = torch.stack([image for image, _ in pairs]).float() / 255.0
    labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return images, labels, FAKE_NUM_CLASSES


def _load_torchvision(name: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    from torchvision import datasets

    classes = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
    }
    try:
        dataset = classes[name](root=str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        # URLError is an OSError; MNIST wraps failed mirrors in a RuntimeError, and a
        # download that arrives corrupted also ends in one.
        subfolder, files = _DOWNLOAD_LAYOUT[name]
        folder = (data_dir / subfolder).resolve()
        raise DatasetUnavailable(
            f"dataset {name} is not in {data_dir.resolve()} and downloading it failed "
            f"({type(exc).__name__}: {_one_line(exc)}); is this worker offline? Download "
            f"it elsewhere and put {files} in the folder {folder}"
        ) from exc

    # Both kinds keep the whole set in memory already (uint8), so no per-image loop.
    data = dataset.data
    if isinstance(data, np.ndarray):  # CIFAR: (N, H, W, C)
        images = torch.from_numpy(data).permute(0, 3, 1, 2)
    else:  # MNIST and FashionMNIST: (N, H, W)
        images = data.unsqueeze(1)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images.float() / 255.0, labels, len(dataset.classes)


def _load_imagefolder(path: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    from torchvision import datasets, transforms

    if not path.is_dir():
        raise DatasetUnavailable(
            f"dataset imagefolder: data_path {path} is not a folder on this worker; "
            "create it with one subfolder of images per class"
        )
    transform = transforms.Compose(
        [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    )
    try:
        dataset = datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:
        raise DatasetUnavailable(
            f"dataset imagefolder: no images found under {path} ({exc}); it needs one "
            "subfolder per class holding .png, .jpg or other image files"
        ) from exc

    pairs = [dataset[index] for index in range(len(dataset))]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return images, labels, len(dataset.classes)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    chunks = [
        F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True)
        for chunk in images.split(RESIZE_CHUNK)
    ]
    return torch.cat(chunks)


def _split(
    images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    count = len(labels)
    if count < 2:
        raise ValueError(f"a data set needs at least 2 images to split, got {count}")
    val_count = min(max(1, round(count * val_fraction)), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_index, train_index = order[:val_count], order[val_count:]
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


def _one_line(exc: BaseException, limit: int = 400) -> str:
    # MNIST's error lists every mirror tried over several lines.
    text = " ".join(str(exc).split()) or "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."
