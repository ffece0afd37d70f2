"""CIFAR-100 (paper A, Appendix A): 20 tasks, one per superclass, each 5-way over its fine classes; ResNet18,
multi-input.

Each task's examples are the release's images of its superclass (2,500 training and 500 test images): a
validation set is held out from the training images. Each task is trained with the cross-entropy and scored by
accuracy. `setting_options.augment` applies the usual augmentation to training batches (random crop with padding 4,
horizontal flip: `data.augment`, padding with the training images' mean colour).
"""
from __future__ import annotations

from mtlcore.settings.base import Setting, Task
from mtlcore.settings.cifar100 import data
from mtlcore.settings.cifar100.model import resnet18
from mtlcore.settings.classification import ACCURACY, CrossEntropy


def task_display_name(task: str) -> str:
    """The superclass's name as words: "aquatic_mammals" → "Aquatic mammals"."""
    return task.replace("_", " ").capitalize()


class CIFAR100(Setting):
    name = "cifar100"
    display_name = "CIFAR-100"
    tasks = data.TASKS
    display_names = {task: task_display_name(task) for task in data.TASKS}
    regime = "multi_input"
    # Per task: 2,000 of its 2,500 training images train, 500 validate; its 500 test images test.
    defaults = {"train_size": 2_000, "val_size": 500, "test_size": 500, "data_seed": 0, "augment": False}
    models = {"resnet18": resnet18}
    default_model = "resnet18"

    def augmentation(self, options):
        return data.augment if options["augment"] else None

    def validate_options(self, options):
        """Sizes beyond the release's refused before any run starts (smaller files are checked when loaded)."""
        if options["train_size"] + options["val_size"] > data.RELEASE_TRAIN_PER_TASK:
            raise ValueError(f"setting options train_size + val_size = {options['train_size']} + {options['val_size']} "
                             f"= {options['train_size'] + options['val_size']} exceed the "
                             f"{data.RELEASE_TRAIN_PER_TASK} training images of a CIFAR-100 task; lower them")
        if options["test_size"] > data.RELEASE_TEST_PER_TASK:
            raise ValueError(f"setting option test_size={options['test_size']} exceeds the "
                             f"{data.RELEASE_TEST_PER_TASK} test images of a CIFAR-100 task; lower it")

    def validate_model_options(self, name, options):
        width = options["width"]
        if not (isinstance(width, int) and not isinstance(width, bool) and width >= 1):
            raise ValueError(f"model option width={width!r} must be an integer >= 1 (ResNet18's is 64)")

    def load(self, tasks, options, root=None, download=True):
        options = self.resolve_options(options)
        options.pop("augment")  # applied to training batches by the trainer (`augmentation`), not to the data
        return data.load(self.check_tasks(tasks), **options, root=root, download=download)

    def write_fixture(self, root, seed=0):
        from mtlcore.settings.cifar100 import fixture

        fixture.write(root, seed=seed)

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        return Task(name, CrossEntropy(), (ACCURACY,))
