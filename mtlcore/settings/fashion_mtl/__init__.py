"""FashionMTL (paper A, §3 and Appendix A): four 10-class image tasks on 28×28 grey images, LeNet, multi-input.

Fashion1 and Fashion2 are disjoint parts of Fashion-MNIST; NoisyFashion is Fashion2's images with shuffled
labels; NotMNIST holds letters A–J. Each task is trained with the cross-entropy and scored by accuracy.
"""
from __future__ import annotations

from pathlib import Path

from mtlcore.settings.base import Setting, Task
from mtlcore.settings.classification import ACCURACY, CrossEntropy
from mtlcore.settings.fashion_mtl import data
from mtlcore.settings.fashion_mtl.model import lenet, lenet_fused

TASK = Task("classification", CrossEntropy(), (ACCURACY,))


class FashionMTL(Setting):
    name = "fashion_mtl"
    display_name = "FashionMTL"
    tasks = data.TASKS
    display_names = {"fashion1": "Fashion1", "fashion2": "Fashion2", "noisy_fashion": "NoisyFashion",
                     "notmnist": "NotMNIST"}
    regime = "multi_input"
    defaults = {"train_size": 25_000, "val_size": 5_000, "test_size": 5_000, "data_seed": 0}
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
        return Task(name, TASK.loss, TASK.scores)

    def missing_optional_files(self, root: Path) -> list[str]:
        return data.missing_optional_files(root)
