"""The CIFAR-100 model (paper A, Appendix A): torchvision's ResNet18 for 32×32 images, a linear head per task."""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from mtlcore.settings.resnet import ResNetModel, resnet_initialize

NUM_CLASSES = 5  # each task is 5-way over its superclass's fine classes


class ResNet18Encoder(ResNet):
    """torchvision's ResNet18 for 32×32 inputs: conv1 is 3×3 with stride 1 (no bias), no max-pool, and no final
    layer (`fc` is the identity), so it gives the penultimate features, 8·width of them (512 at width 64).

    `width`: the channels of the first stage (64 in ResNet18; the stages have width, 2·width, 4·width, 8·width). At
    64 the network is torchvision's `resnet18()` with the stem and `fc` replaced; smaller widths are for tests."""

    def __init__(self, width: int = 64):
        nn.Module.__init__(self)
        # What torchvision's ResNet.__init__ sets for `_make_layer`, with the stage widths scaled.
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_features = 8 * width * BasicBlock.expansion
        resnet_initialize(self)  # as torchvision's ResNet (the trainer redoes it, seeded)


def resnet18(tasks: list[str], *, width: int = 64) -> ResNetModel:
    """ResNet18 (32×32 stem, penultimate features) shared by every task, a linear head (8·width → 5) per task."""
    encoder = ResNet18Encoder(width)
    return ResNetModel(encoder, {task: nn.Linear(encoder.out_features, NUM_CLASSES) for task in tasks})
