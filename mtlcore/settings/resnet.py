"""The multi-task model of the ResNet settings: torchvision's ResNet initialisation under the trainer's seeding."""
from __future__ import annotations

from torch import nn

from mtlcore.settings.base import MultiTaskModel


def resnet_initialize(module: nn.Module) -> None:
    """torchvision ResNet's initialisation of every submodule: He-normal convolutions (fan out, ReLU), BatchNorm at
    weight 1 and bias 0 (running statistics reset), PyTorch's defaults elsewhere (linear layers)."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()


class ResNetModel(MultiTaskModel):
    """A MultiTaskModel that the trainer's seeded (re)initialisation initialises as torchvision's ResNet."""

    def initialize(self, module: nn.Module) -> None:
        resnet_initialize(module)
