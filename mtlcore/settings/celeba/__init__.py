"""CelebA (paper A, Appendix A): 40 binary face attributes of the same aligned image (single input), ResNet18.

Each attribute is a task: 2-way cross-entropy, scored by accuracy (primary) and by the F1 score of its positive
class (the attribute present). Data, splits and the image cache: `data.py`; the model: `model.py`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mtlcore.settings.base import Score, Setting, Task
from mtlcore.settings.celeba import data
from mtlcore.settings.celeba.model import resnet18
from mtlcore.settings.classification import ACCURACY, CrossEntropy


def _confusion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[true positives, false positives, false negatives] of the positive class (1: the attribute is present)."""
    predicted, actual = outputs.argmax(dim=1) == 1, targets == 1
    return torch.stack([(predicted & actual).sum(), (predicted & ~actual).sum(), (~predicted & actual).sum()]).double()


def _f1(total: torch.Tensor) -> float:
    """2TP / (2TP + FP + FN) over the split; 0 when the denominator is 0 (nothing predicted positive and no
    positive example: sklearn's zero_division=0)."""
    tp, fp, fn = (float(v) for v in total)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


F1 = Score("f1", higher_is_better=True, statistics=_confusion, value=_f1, percent=True)
LOSS = CrossEntropy()


class CelebA(Setting):
    name = "celeba"
    display_name = "CelebA"
    tasks = data.TASKS
    display_names = {task: task.replace("_", " ") for task in data.TASKS}
    regime = "single_input"
    defaults = {**{f"{split}_size": size for split, size in data.PARTITION_SIZES.items()},
                "image_size": 64, "data_seed": 0}
    models = {"resnet18": resnet18}
    default_model = "resnet18"

    def load(self, tasks, options, root=None, download=True):
        return data.load(self.check_tasks(tasks), **self.resolve_options(options), root=root, download=download)

    def validate_model_options(self, name, options):
        width = options["width"]
        if not (isinstance(width, int) and not isinstance(width, bool) and width >= 1):
            raise ValueError(f"model option width={width!r} must be a positive integer (64: ResNet18's channels)")

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        return Task(name, LOSS, (ACCURACY, F1))

    def missing_optional_files(self, root: Path) -> list[str]:
        """JPEGs listed in the partition file but absent: needed only when the sizes select them."""
        missing = data.missing_images(root)
        if not missing:
            return []
        return [f"{len(missing)} JPEG(s) listed in {data.PARTITION_FILE} are not in {data.IMAGE_FOLDER}/ (e.g. "
                f"{missing[:3]}); loads that select them fail: extract img_align_celeba.zip again"]

    def write_fixture(self, root, seed=0):
        from mtlcore.settings.celeba import fixture

        fixture.write(Path(root) / "celeba", seed=seed, n_images=60)
