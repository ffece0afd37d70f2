"""CelebA's model (paper A, Appendix A): torchvision's ResNet18 (never pretrained) with its classifier replaced by
the identity (512 features), behind a fixed normalisation layer, and one linear head (512 → 2) per attribute."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from mtlcore.settings.resnet import ResNetModel

NUM_CLASSES = 2  # absent, present


class Normalize(nn.Module):
    """uint8 images → float: (x/255 − mean)/std per channel, computed in float64 and rounded once to the model's
    dtype; no parameters. The inputs carry (mean, std) of the training images with every example (`data.py`):
    the trainer builds a model without its data, so the statistics cannot be set at construction."""

    def forward(self, inputs: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not isinstance(inputs, Mapping) or not {"images", "normalization"} <= set(inputs):
            raise TypeError("the CelebA model takes the setting's inputs, a mapping with `images` (N×3×S×S uint8) "
                            f"and `normalization` (N×2×3: mean, std per channel); got {type(inputs).__name__}")
        images, statistics = inputs["images"], inputs["normalization"].to(torch.float64)
        mean, std = statistics[:, 0, :, None, None], statistics[:, 1, :, None, None]
        return ((images.to(torch.float64) / 255.0 - mean) / std).to(dtype)


class CelebAEncoder(nn.Module):
    """Normalisation, then ResNet18 up to its global average pool (8 × `width` features)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.normalize = Normalize()
        self.resnet = _resnet18(width)
        self.out_features = 8 * width

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.resnet(self.normalize(inputs, self.resnet.conv1.weight.dtype))


def _resnet18(width: int) -> ResNet:
    """torchvision's ResNet18 (`fc` the identity). `width` ≠ 64 scales every layer's channels (width, 2·width,
    4·width, 8·width): the same architecture, narrower (torchvision's BasicBlock fixes its width at 64)."""
    net = ResNet(BasicBlock, [2, 2, 2, 2])
    if width != 64:
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
    net.fc = nn.Identity()
    return net


class CelebAResNet(ResNetModel):
    def last_shared_layer(self) -> list[nn.Parameter]:
        """GradNorm's W: the last convolution of the encoder (the base class would pick the BatchNorm after it)."""
        return [p for p in self.encoder.resnet.layer4[-1].conv2.parameters() if p.requires_grad]


def resnet18(tasks: list[str], *, width: int = 64) -> ResNetModel:
    """ResNet18 encoder (512 features at the default `width` 64; never pretrained) and a linear head per task."""
    encoder = CelebAEncoder(width)
    return CelebAResNet(encoder, {task: nn.Linear(encoder.out_features, NUM_CLASSES) for task in tasks})
