"""Sener & Koltun's MultiLeNet encoder (REFERENCE §1.1)."""
from __future__ import annotations

import torch
from torch import nn

from mtlcore.models.fused import conv_dropout_pool_relu, conv_pool_relu


class LeNetEncoder(nn.Module):
    """conv(1→10,k5) → maxpool2 → ReLU → conv(10→20,k5) → dropout → maxpool2 → ReLU → 320 → 50 → ReLU."""

    out_features = 50

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        # Dropout2d as in Sener & Koltun's MultiLeNet (whole feature maps are dropped).
        self.dropout = nn.Dropout2d(p=dropout)
        self.fc = nn.Linear(320, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_pool_relu(x, self.conv1)  # one fused kernel on the CPU (mtlcore/models/fused.py)
        x = conv_dropout_pool_relu(x, self.conv2, self.dropout)  # a sparse backward on the CPU (fused.py)
        return torch.relu(self.fc(x.flatten(1)))
