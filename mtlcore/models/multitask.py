"""A shared encoder with one head per task."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class MultiTaskModel(nn.Module):
    """`encoder(x) -> z` is shared; `heads[task](z)` gives that task's output.

    `model(x, task)` is the output of one task; `model.shared_parameters()` are the encoder's
    parameters (the ones aggregators act on), `model.task_parameters(task)` the head's.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.encoder(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self.heads[task].parameters() if p.requires_grad]

    def last_shared_layer(self) -> list[nn.Parameter]:
        """Parameters of the encoder's last parametrised module (GradNorm's W)."""
        modules = [m for m in self.encoder.modules() if any(True for _ in m.parameters(recurse=False))]
        return [p for p in modules[-1].parameters(recurse=False) if p.requires_grad]


ENCODERS = {"lenet": "mtlcore.models.lenet:LeNetEncoder"}


def build_model(encoder: str, num_classes: Mapping[str, int], **encoder_options) -> MultiTaskModel:
    """Build `encoder` with a linear head per task (`num_classes[task]` outputs)."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid encoders: {sorted(ENCODERS)}")
    module_name, class_name = ENCODERS[encoder].split(":")
    import importlib

    encoder_cls = getattr(importlib.import_module(module_name), class_name)
    trunk = encoder_cls(**encoder_options)
    heads = {task: nn.Linear(trunk.out_features, n) for task, n in num_classes.items()}
    return MultiTaskModel(trunk, heads)
