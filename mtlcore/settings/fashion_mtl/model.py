"""Sener & Koltun's MultiLeNet (paper A, Appendix A): the FashionMTL models `lenet` and `lenet_fused`."""
from __future__ import annotations

import torch
from torch import nn

from mtlcore.settings.base import MultiTaskModel
from mtlcore.settings.fashion_mtl.fused import conv_dropout_pool_relu, conv_pool_relu, kernel_name

NUM_CLASSES = 10


class LeNetEncoder(nn.Module):
    """conv(1→10,k5) → maxpool2 → ReLU → conv(10→20,k5) → dropout → maxpool2 → ReLU → 320 → 50 → ReLU.

    `fused`: the two conv blocks run on the CPU kernels of `fused.py` where they apply (the same function with
    other float32 rounding); otherwise PyTorch's ops.
    """

    out_features = 50

    def __init__(self, dropout: float = 0.5, fused: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        # Dropout2d as in Sener & Koltun's MultiLeNet (whole feature maps are dropped).
        self.dropout = nn.Dropout2d(p=dropout)
        self.fc = nn.Linear(320, self.out_features)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = conv_pool_relu(x, self.conv1)
            x = conv_dropout_pool_relu(x, self.conv2, self.dropout)
        else:
            x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
            x = torch.relu(torch.max_pool2d(self.dropout(self.conv2(x)), 2))
        return torch.relu(self.fc(x.flatten(1)))


class MultiLeNet(MultiTaskModel):
    memory_format = torch.channels_last  # oneDNN's fast layout for small-channel convolutions on the CPU

    def describe(self, device: torch.device) -> dict:
        """Which code computed the fused conv blocks: the kernel runs on the CPU only, and PyTorch's fallback (no
        compiler) rounds differently again."""
        if not self.encoder.fused:
            return {}
        return {"lenet_kernel": kernel_name() if torch.device(device).type == "cpu" else "pytorch"}


def _multilenet(tasks: list[str], dropout: float, fused: bool) -> MultiTaskModel:
    encoder = LeNetEncoder(dropout, fused)
    return MultiLeNet(encoder, {task: nn.Linear(encoder.out_features, NUM_CLASSES) for task in tasks})


def lenet(tasks: list[str], *, dropout: float = 0.5) -> MultiTaskModel:
    """MultiLeNet with PyTorch's ops: a linear head (50 → 10 classes) per task."""
    return _multilenet(tasks, dropout, fused=False)


def lenet_fused(tasks: list[str], *, dropout: float = 0.5) -> MultiTaskModel:
    """The same network with its conv blocks on the fused CPU kernels (compiled on first use; PyTorch's ops where
    they cannot be built or do not apply). Its runs have their own content hash: it rounds differently."""
    return _multilenet(tasks, dropout, fused=True)
