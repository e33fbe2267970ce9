"""Classifiers by name, shaped for a data set's channels, image size and classes.

- `cnn` (the default): two conv blocks and a linear head; works from 8 x 8 pixels up.
- `mlp`: flatten, 128 hidden units, ReLU, linear head.
- the torchvision classifiers of `clrsearch.spec.TORCHVISION_MODELS`, randomly
  initialised (weights are never downloaded), with the stem convolution taking
  `in_channels`, the head giving `num_classes`, and inputs below 32 pixels upsampled
  to 32 inside the model, since these nets downsample by 32 and would otherwise run
  out of pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from clrsearch.spec import MODEL_NAMES, TORCHVISION_MODELS

# The smallest input the torchvision nets are fed; smaller images are upsampled to it.
TORCHVISION_MIN_SIZE = 32
MLP_HIDDEN = 128


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A randomly initialised classifier giving `(N, num_classes)` logits.

    Seed torch before calling for reproducible weights.
    """
    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, MLP_HIDDEN),
            nn.ReLU(),
            nn.Linear(MLP_HIDDEN, num_classes),
        )
    if name in TORCHVISION_MODELS:
        return _torchvision_model(name, in_channels, image_size, num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a linear head.

    Each block halves the image (8 x 8 becomes 2 x 2); the adaptive pool then fixes the
    head's input at 2 x 2 whatever the image size.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, 2 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        # No bias: the batch norm right after has its own.
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def _torchvision_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    import torchvision

    # weights=None builds the architecture only; num_classes sizes the head.
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    if image_size < TORCHVISION_MIN_SIZE:
        model = nn.Sequential(
            nn.Upsample(size=TORCHVISION_MIN_SIZE, mode="bilinear", align_corners=False),
            model,
        )
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first convolution for one taking `in_channels`, otherwise the same."""
    # In every supported net the stem is the first Conv2d registered.
    path, stem = next(
        (path, module) for path, module in model.named_modules() if isinstance(module, nn.Conv2d)
    )
    replacement = nn.Conv2d(
        in_channels,
        stem.out_channels,
        kernel_size=stem.kernel_size,
        stride=stem.stride,
        padding=stem.padding,
        dilation=stem.dilation,
        groups=stem.groups,
        bias=stem.bias is not None,
    )
    # The initialisation torchvision gives these stems; fan_out does not depend on
    # in_channels, so the new stem starts at the same scale as the original.
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    if replacement.bias is not None:
        nn.init.zeros_(replacement.bias)

    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, replacement)
