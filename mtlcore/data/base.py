"""Containers shared by every setting."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class TaskData:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    kind: str = "classification"  # or "regression"
    metric: str = "accuracy"
    normalization: tuple[float, float] = (0.0, 1.0)  # inputs are (raw/255 - mean) / std

    @property
    def loss(self) -> str:
        """The training loss's name in `mtlcore.metrics` terms."""
        return "cross_entropy" if self.kind == "classification" else "mse"

    def to(self, device: torch.device | str) -> "TaskData":
        return TaskData(self.name, self.train.to(device), self.val.to(device), self.test.to(device),
                        self.num_classes, self.kind, self.metric, self.normalization)


@dataclass
class Setting:
    """The tasks of one multi-task setting, ready for training."""

    name: str
    tasks: dict[str, TaskData]
    encoder: str
    regime: str = "multi_input"  # each task has its own images; a step draws one batch per task
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Setting":
        return Setting(self.name, {k: t.to(device) for k, t in self.tasks.items()}, self.encoder, self.regime, self.info)
