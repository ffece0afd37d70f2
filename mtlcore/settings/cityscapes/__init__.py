"""Cityscapes (paper A, Appendix A): 7-class semantic segmentation and (inverse) depth of the same 128×256 street image
(single input), DeepLabV3 with a dilated ResNet backbone and one ASPP head per task.

Segmentation: per-pixel cross-entropy over the labelled pixels, scored by mIoU (primary) and pixel accuracy from the
confusion matrix of the whole split. Depth: L1 over the pixels with a depth, scored by the absolute (primary, lower is
better) and relative error over every such pixel of the split. Losses, scores and the Fisher of these dense tasks:
`losses.py`; the data and its splits: `data.py`; the model: `model.py`; small files in the released layout for tests:
`fixture.py`.

Setting option `classes: 19` reads the 19-class labels (`label_19/`); the model must then predict 19 classes (model
option `segmentation_classes: 19`): a mismatch stops the first training step with an error that says so.
"""
from __future__ import annotations

from pathlib import Path

from mtlcore._validation import is_int
from mtlcore.settings.base import Setting, Task
from mtlcore.settings.cityscapes import data
from mtlcore.settings.cityscapes.losses import (
    ABS_ERR,
    MIOU,
    PIXEL_ACCURACY,
    REL_ERR,
    DepthL1,
    PixelCrossEntropy,
)
from mtlcore.settings.cityscapes.model import DEPTHS, deeplabv3

LOSSES = {"segmentation": PixelCrossEntropy(), "depth": DepthL1()}
SCORES = {"segmentation": (MIOU, PIXEL_ACCURACY), "depth": (ABS_ERR, REL_ERR)}


class Cityscapes(Setting):
    name = "cityscapes"
    display_name = "Cityscapes"
    tasks = data.TASKS
    display_names = {"segmentation": "Segmentation", "depth": "Depth"}
    regime = "single_input"
    # 500 of the release's 2,975 training images validate (as many as it has test images); its 500 `val` images test.
    defaults = {"train_size": 2_475, "val_size": 500, "test_size": 500, "data_seed": 0, "classes": 7}
    models = {"deeplabv3": deeplabv3}
    default_model = "deeplabv3"

    def validate_options(self, options):
        """Sizes beyond the release's refused before any run starts (a smaller copy is checked when loaded)."""
        if options["classes"] not in data.LABEL_FOLDERS:
            raise ValueError(f"setting option classes={options['classes']!r}; valid values: {list(data.LABEL_FOLDERS)}")
        train = options["train_size"] + options["val_size"]
        if train > data.RELEASE_SIZES["train"]:
            raise ValueError(f"setting options train_size + val_size = {train} exceed the release's "
                             f"{data.RELEASE_SIZES['train']} training images; lower them")
        if options["test_size"] > data.RELEASE_SIZES["val"]:
            raise ValueError(f"setting option test_size={options['test_size']} exceeds the release's "
                             f"{data.RELEASE_SIZES['val']} `val` images (the test split); lower it")

    def validate_model_options(self, name, options):
        if options["depth"] not in DEPTHS:
            raise ValueError(f"model option depth={options['depth']!r}; valid depths: {sorted(DEPTHS)}")
        for key, meaning in (("width", "64: torchvision's ResNet"), ("aspp_channels", "256: torchvision's"),
                             ("segmentation_classes", "7, or 19 with setting option classes=19")):
            if not is_int(options[key], 1):
                raise ValueError(f"model option {key}={options[key]!r} must be a positive integer ({meaning})")
        weights = options["weights"]
        if weights is not None:
            if not isinstance(weights, str):
                raise ValueError(f"model option weights={weights!r} must be the path of a torchvision ResNet "
                                 "checkpoint, or null")
            if options["width"] != 64:
                raise ValueError(f"model option weights needs width=64 (torchvision's ResNet), not {options['width']}")

    def load(self, tasks, options, root=None, download=True):
        """`download` is ignored: the preprocessed archive is not downloadable automatically (see `data.how_to_get`)."""
        return data.load(self.check_tasks(tasks), **self.resolve_options(options), root=root)

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        return Task(name, LOSSES[name], SCORES[name])

    def missing_optional_files(self, root: Path) -> list[str]:
        return data.missing_optional_files(root)

    def write_fixture(self, root, seed=0):
        from mtlcore.settings.cityscapes import fixture

        fixture.write(Path(root), seed=seed, train=12, val=6)
