"""FashionPool: a pool of ten small image tasks for the CPU analog of paper A's §5 (random auxiliary sets).

Paper A's §5 draws random sets of auxiliary tasks for a few CIFAR-100 targets. This setting offers a pool of the
same kind on the offline data: 10-way Fashion-MNIST (`fashion`) and notMNIST letters (`letters`), five binary tasks
between two Fashion-MNIST classes, and 10-way Fashion-MNIST at three label-noise levels (see `data`). Every task has
its own images (multi-input), MultiLeNet's encoder (FashionMTL's) with a linear head sized to its classes,
cross-entropy and accuracy.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from mtlcore.settings.base import MultiTaskModel, Setting, Task
from mtlcore.settings.classification import ACCURACY, CrossEntropy
from mtlcore.settings.fashion_mtl import data as fashion_data
from mtlcore.settings.fashion_mtl.model import LeNetEncoder, MultiLeNet
from mtlcore.settings.fashion_pool import data

LOSS = CrossEntropy()


def _multilenet(tasks: list[str], dropout: float, fused: bool) -> MultiTaskModel:
    encoder = LeNetEncoder(dropout, fused)
    return MultiLeNet(encoder, {t: nn.Linear(encoder.out_features, data.TASKS[t].classes) for t in tasks})


def lenet(tasks: list[str], *, dropout: float = 0.5) -> MultiTaskModel:
    """MultiLeNet with PyTorch's ops: a linear head (50 → the task's classes) per task."""
    return _multilenet(tasks, dropout, fused=False)


def lenet_fused(tasks: list[str], *, dropout: float = 0.5) -> MultiTaskModel:
    """The same network with its conv blocks on FashionMTL's fused CPU kernels (its own content hash)."""
    return _multilenet(tasks, dropout, fused=True)


def _display_name(task: str) -> str:
    spec = data.TASKS[task]
    if spec.pair:
        first, second = (data.FASHION_CLASSES[c] for c in spec.pair)
        return f"{first} vs {second}"
    if spec.noise:
        return f"Fashion, {spec.noise:.0%} noise"
    return {"fashion": "Fashion", "letters": "Letters"}[task]


class FashionPool(Setting):
    name = "fashion_pool"
    display_name = "FashionPool"
    tasks = tuple(data.TASKS)
    display_names = {t: _display_name(t) for t in data.TASKS}
    regime = "multi_input"
    defaults = {"train_size": 5_000, "val_size": 1_000, "test_size": 1_000, "data_seed": 0}
    models = {"lenet": lenet, "lenet_fused": lenet_fused}
    default_model = "lenet"

    def load(self, tasks, options, root=None, download=True):
        return data.load(self.check_tasks(tasks), **self.resolve_options(options), root=root, download=download)

    def validate_model_options(self, name, options):
        dropout = options["dropout"]
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise ValueError(f"model option dropout={dropout!r} must be a number in [0, 1)")

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        return Task(name, LOSS, (ACCURACY,))

    def missing_optional_files(self, root: Path) -> list[str]:
        return fashion_data.missing_optional_files(root)
