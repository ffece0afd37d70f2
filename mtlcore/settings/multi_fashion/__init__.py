"""MultiFashion: two Fashion-MNIST items overlaid with an offset on one 28×28 image (single input); the tasks classify
the left item and the right item (10 classes each), LeNet, cross-entropy, accuracy. The `offset` option sets how much
the items cover each other, an interference the data controls (see `data.py`)."""
from __future__ import annotations

from mtlcore.settings.base import Setting, Task
from mtlcore.settings.classification import ACCURACY, CrossEntropy
from mtlcore.settings.fashion_mtl.model import lenet, lenet_fused
from mtlcore.settings.multi_fashion import data

LOSS = CrossEntropy()


class MultiFashion(Setting):
    name = "multi_fashion"
    display_name = "MultiFashion"
    tasks = data.TASKS
    display_names = {"left": "Left item", "right": "Right item"}
    regime = "single_input"
    defaults = {"train_size": 25_000, "val_size": 5_000, "test_size": 5_000, "offset": 8, "data_seed": 0}
    models = {"lenet": lenet, "lenet_fused": lenet_fused}
    default_model = "lenet"

    def load(self, tasks, options, root=None, download=True):
        return data.load(self.check_tasks(tasks), **self.resolve_options(options), root=root, download=download)

    def validate_options(self, options):
        if options["offset"] > data.SIZE:
            raise ValueError(f"setting option offset={options['offset']!r} must be at most {data.SIZE} "
                             "(0: the items cover each other; 28: side by side)")

    def validate_model_options(self, name, options):
        dropout = options["dropout"]
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise ValueError(f"model option dropout={dropout!r} must be a number in [0, 1)")

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        return Task(name, LOSS, (ACCURACY,))
