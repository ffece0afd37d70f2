"""Cityscapes's model (paper A, Appendix A): DeepLabV3, a dilated ResNet backbone shared by the tasks and one ASPP head
per task (torchvision's `DeepLabHead`), each head's output upsampled to the input size.

Backbone: torchvision's ResNet stages (`ResNet._make_layer`, so a checkpoint of `torchvision.models.resnet*` loads
into it), without the average pool and the classifier, at output stride 8: the last two stages keep their resolution
and dilate their 3×3 convolutions instead (2 and 4). ResNet50/101 (Bottleneck) get this from torchvision's
`replace_stride_with_dilation=[False, True, True]`, as torchvision's `deeplabv3_resnet50`; torchvision refuses dilation
in ResNet18's BasicBlock, so ResNet18 is dilated afterwards by the same rule as the dilated ResNets of MTAN and LibMTL
(each stage's strided convolution gets stride 1 and half the stage's dilation, its other 3×3 convolutions the stage's
dilation). At 128×256 the features are 16×32.

Inputs are the setting's images (N×3×H×W floats in [0, 1], H and W multiples of 8), normalised by ImageNet's channel
mean and std as torchvision's ImageNet weights expect (with random initialisation the BatchNorm after the first
convolution makes this fixed affine map immaterial). ImageNet weights come only from a local file (`weights`), never
downloaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP

from mtlcore.settings.resnet import ResNetModel, resnet_initialize

OUTPUT_STRIDE = 8
ATROUS_RATES = (12, 24, 36)  # torchvision's DeepLabHead
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}
OUT_CHANNELS = {"depth": 1}  # segmentation: the number of classes (a model option)


class DilatedResNet(ResNet):
    """torchvision's ResNet of `depth` (18, 50 or 101) at output stride 8, up to its last stage (no pool, no
    classifier).

    `width`: the first stage's channels (64 in torchvision's; the stages have width, 2·, 4·, 8·width, times the block's
    expansion). At 64 the parameters are exactly those of `torchvision.models.resnet{depth}` without `fc`."""

    def __init__(self, depth: int = 18, width: int = 64):
        nn.Module.__init__(self)
        block, layers = DEPTHS[depth]
        bottleneck = block is Bottleneck
        # What torchvision's ResNet.__init__ sets for `_make_layer`, with the stage widths scaled.
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2, dilate=bottleneck)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2, dilate=bottleneck)
        if not bottleneck:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)
        self.depth, self.out_channels = depth, 8 * width * block.expansion
        resnet_initialize(self)  # as torchvision's ResNet (the trainer redoes it, seeded)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def last_convolution(self) -> nn.Conv2d:
        last = self.layer4[-1]
        return last.conv3 if isinstance(last, Bottleneck) else last.conv2


def _dilate(stage: nn.Sequential, dilation: int) -> None:
    """Turn a stride-2 stage into a stride-1 stage with dilated 3×3 convolutions (the rule of the dilated ResNets of
    MTAN and LibMTL): the strided convolutions get stride 1 (a 3×3 one dilation and padding dilation/2), every other
    3×3 convolution dilation and padding `dilation`."""
    for module in stage.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = module.padding = (dilation // 2, dilation // 2)
        elif module.kernel_size == (3, 3):
            module.dilation = module.padding = (dilation, dilation)


class Normalize(nn.Module):
    """(x − ImageNet mean) / ImageNet std per channel; no parameters, buffers not saved (constants)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


class DeepLabEncoder(nn.Module):
    """Normalisation, then the dilated ResNet: N×3×H×W images → N×C×H/8×W/8 features."""

    def __init__(self, depth: int = 18, width: int = 64):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = DilatedResNet(depth, width)
        self.out_channels = self.backbone.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError("the Cityscapes model takes N×3×H×W images; got "
                            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        height, width = images.shape[-2:]
        if height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
            raise ValueError(f"image size {height}×{width}: DeepLabV3 at output stride {OUTPUT_STRIDE} needs height "
                             f"and width that are multiples of {OUTPUT_STRIDE} (the release's images are 128×256)")
        return self.backbone(self.normalize(images.to(self.backbone.conv1.weight.dtype)))


class DeepLabHead(nn.Sequential):
    """torchvision's `DeepLabHead` (ASPP with rates 12, 24, 36 → 3×3 convolution, BatchNorm, ReLU → 1×1 convolution to
    `out_channels`) with its ASPP width as a parameter (torchvision's is 256), then bilinear upsampling by the output
    stride: at H and W multiples of 8 this is torchvision's DeepLabV3 upsampling to the input size
    (align_corners=False)."""

    def __init__(self, in_channels: int, out_channels: int, aspp_channels: int = 256):
        super().__init__(
            ASPP(in_channels, list(ATROUS_RATES), aspp_channels),
            nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
            nn.Conv2d(aspp_channels, out_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(features), scale_factor=OUTPUT_STRIDE, mode="bilinear",
                             align_corners=False)


class DeepLabV3(ResNetModel):
    """DeepLabV3's encoder and heads under the trainer's seeded ResNet initialisation."""

    def __init__(self, encoder: DeepLabEncoder, heads, weights: dict | None = None):
        super().__init__(encoder, heads, pretrained_encoder=weights is not None)
        self.weights = weights

    def last_shared_layer(self) -> list[nn.Parameter]:
        """GradNorm's W: the encoder's last convolution (the base class would pick the BatchNorm after it)."""
        return [p for p in self.encoder.backbone.last_convolution().parameters() if p.requires_grad]

    def describe(self, device: torch.device) -> dict:
        return {"architecture": "DeepLabV3", "backbone": f"resnet{self.encoder.backbone.depth}",
                "output_stride": OUTPUT_STRIDE, "imagenet_weights": self.weights}


def weights_url(depth: int) -> str:
    """torchvision's address of the ImageNet weights of ResNet`depth` (read from its registry: nothing downloads)."""
    from torchvision.models import ResNet18_Weights, ResNet50_Weights, ResNet101_Weights

    return {18: ResNet18_Weights, 50: ResNet50_Weights, 101: ResNet101_Weights}[depth].IMAGENET1K_V1.url


def load_imagenet_weights(backbone: DilatedResNet, path: str | Path) -> dict:
    """Load a torchvision ResNet checkpoint (a state dict, or a mapping with `state_dict`) into `backbone`, its
    classifier (`fc.*`) dropped; every other tensor must match. Returns the file and its MD5 (run provenance)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file {path} not found; download torchvision's "
                                f"ResNet{backbone.depth} weights ({weights_url(backbone.depth)}) to it, or leave "
                                "model option `weights` unset for a random initialisation")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} is not a torchvision ResNet{backbone.depth} checkpoint: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return {"file": str(path.resolve()), "md5": hashlib.md5(path.read_bytes()).hexdigest()}


def deeplabv3(tasks: list[str], *, depth: int = 18, width: int = 64, aspp_channels: int = 256,
              segmentation_classes: int = 7, weights: str | None = None) -> DeepLabV3:
    """DeepLabV3 with a dilated ResNet`depth` backbone (18, 50 or 101; `width` 64 is torchvision's) and a DeepLabHead
    per task: `segmentation_classes` output channels for segmentation (7, or 19 with setting option classes=19), one for
    depth. `weights`: a local torchvision ImageNet checkpoint of the backbone (None: random initialisation)."""
    encoder = DeepLabEncoder(depth, width)
    provenance = None if weights is None else load_imagenet_weights(encoder.backbone, weights)
    channels = {"segmentation": segmentation_classes, **OUT_CHANNELS}
    heads = {task: DeepLabHead(encoder.out_channels, channels[task], aspp_channels) for task in tasks}
    return DeepLabV3(encoder, heads, provenance)
