"""Models selectable by name.

All models are normalised with GroupNorm (or LayerNorm for the Transformer), never
BatchNorm: BatchNorm running statistics are buffers that would leave a client's data
unclipped and un-noised in its update (see ``dpfl.privacy.validation``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import BasicBlock, ResNet

from dpfl.errors import UsageError
from dpfl.task.recipes import VIT_DEPTH

# Two groups, as in the DP-FedPGN reference models (GN-ResNet).
GROUP_NORM_GROUPS = 2
# The models whose depth is a setting; a convolutional model's is fixed by its name.
DEPTH_SETTABLE = ("vit",)


def group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, num_channels)


class CompactResNet(ResNet):
    """torchvision's ResNet with a CIFAR-style 3x3 stem and a configurable width.

    torchvision hard-codes the stage widths 64-128-256-512; client-level DP noise on
    the mean update grows with the square root of the parameter count, so the
    federated default needs narrower stages. This subclass builds the stem itself and
    reuses torchvision's ``_make_layer``, ``BasicBlock`` and ``forward``.
    """

    def __init__(
        self,
        layers: list[int],
        num_classes: int,
        in_channels: int,
        width: int,
        norm_layer: Callable[[int], nn.Module] = group_norm,
    ) -> None:
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64  # BasicBlock accepts only the default base width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # CIFAR-style stem: no max-pool
        self.layer1 = self._make_layer(BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(BasicBlock, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks and a linear head: the benchmark's small CNN."""

    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            group_norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            group_norm(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallViT(VisionTransformer):
    """torchvision's VisionTransformer for small images and any number of channels."""

    def __init__(
        self, num_classes: int, in_channels: int, image_size: int, width: int, patch_size: int, depth: int = VIT_DEPTH
    ) -> None:
        super().__init__(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=depth,
            num_heads=4,
            hidden_dim=4 * width,
            mlp_dim=8 * width,
            num_classes=num_classes,
        )
        # torchvision's patch embedding assumes RGB input.
        self.conv_proj = nn.Conv2d(in_channels, 4 * width, kernel_size=patch_size, stride=patch_size)


def _vit(num_classes: int, in_channels: int, image_size: int, width: int, depth: int) -> nn.Module:
    patch_size = 2 if image_size <= 16 else 4
    if image_size % patch_size:
        raise UsageError(
            f"image size {image_size} is not a multiple of the ViT patch size {patch_size}"
        )
    return SmallViT(num_classes, in_channels, image_size, width, patch_size, depth)


def _resnet(layers: list[int]) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, width: int, depth: int) -> nn.Module:
        return CompactResNet(layers, num_classes, in_channels, width)

    return build


def _cnn(num_classes: int, in_channels: int, image_size: int, width: int, depth: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet10": _resnet([1, 1, 1, 1]),
    "resnet18": _resnet([2, 2, 2, 2]),
    "vit": _vit,
    "cnn": _cnn,
}


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int, width: int = 16, depth: int = VIT_DEPTH
) -> nn.Module:
    """Build a model by name; ``width`` is the first stage's channel count, ``depth`` the
    ViT's number of encoder blocks (a convolutional model's depth is fixed by its name)."""
    if name not in MODEL_BUILDERS:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_BUILDERS)}")
    if width < GROUP_NORM_GROUPS or width % GROUP_NORM_GROUPS:
        raise UsageError(f"model width {width} must be a positive multiple of {GROUP_NORM_GROUPS}")
    check_depth(name, depth)
    return MODEL_BUILDERS[name](num_classes, in_channels, image_size, width, depth)


def check_depth(name: str, depth: int) -> None:
    """A one-line error unless ``depth`` is a depth model ``name`` can be built with."""
    if depth < 1:
        raise UsageError(f"model depth must be >= 1, got {depth}")
    if name not in DEPTH_SETTABLE and depth != VIT_DEPTH:
        raise UsageError(
            f"model depth {depth} applies to the {', '.join(DEPTH_SETTABLE)} only; {name}'s depth is fixed by its name"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DEPTH_SETTABLE", "MODEL_BUILDERS", "VIT_DEPTH", "build_model", "check_depth", "count_parameters"]
