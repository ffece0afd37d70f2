"""MultiFashion's data: two Fashion-MNIST items on one image, the left item's class and the right item's class.

As MultiMNIST and MultiFashion in the Pareto-MTL literature (Sabour et al. 2017; Lin et al. 2019): the left item sits
at the top left of a (28 + offset)² canvas, the right item `offset` pixels lower and further right, the two overlaid
by the pixelwise maximum, and the canvas resized to 28×28 (bilinear) and rounded back to 8-bit pixels. `offset`
controls the interference: at 0 both items cover each other entirely, at 28 they no longer overlap. Every item is
used once: the training and validation images pair disjoint Fashion-MNIST training images, the test images pair its
test images, all drawn by `data_seed`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import Examples, SettingData, single_input_data
from mtlcore.settings.fashion_mtl.data import FASHION_FILES, _read_fashion, _standardise, _take, fashion_mnist_folder
from mtlcore.settings.locate import data_root

TASKS = ("left", "right")
SIZE = 28


def compose(left: np.ndarray, right: np.ndarray, offset: int) -> np.ndarray:
    """Overlay 28×28 uint8 items (n each): `left` at the top left, `right` shifted by `offset` down and right, the
    pixelwise maximum resized from (28 + offset)² to 28×28 and rounded to uint8."""
    if left.shape != right.shape or left.shape[1:] != (SIZE, SIZE) or left.dtype != np.uint8:
        raise ValueError(f"compose takes two uint8 arrays of shape (n, {SIZE}, {SIZE}), got {left.shape} "
                         f"{left.dtype} and {right.shape} {right.dtype}")
    if not (isinstance(offset, int) and 0 <= offset <= SIZE):
        raise ValueError(f"offset={offset!r} must be an integer in [0, {SIZE}] (pixels between the two items)")
    canvas = np.zeros((len(left), SIZE + offset, SIZE + offset), dtype=np.uint8)
    canvas[:, :SIZE, :SIZE] = left
    canvas[:, offset:, offset:] = np.maximum(canvas[:, offset:, offset:], right)
    if offset == 0:
        return canvas
    resized = F.interpolate(torch.from_numpy(canvas).unsqueeze(1).float(), size=(SIZE, SIZE), mode="bilinear",
                            align_corners=False, antialias=False)
    return resized.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load(tasks: list[str], train_size: int = 25_000, val_size: int = 5_000, test_size: int = 5_000, offset: int = 8,
         data_seed: int = 0, root: str | Path | None = None, download: bool = True) -> SettingData:
    """`train_size`, `val_size` and `test_size` composite images, each labelled with its left and right item's class."""
    root = data_root(root)
    folder = fashion_mnist_folder(root, download)
    x_train, y_train, train_md5 = _read_fashion(folder, *FASHION_FILES[:2])
    x_test, y_test, test_md5 = _read_fashion(folder, *FASHION_FILES[2:])
    left_train, right_train, left_val, right_val = _take(
        len(x_train), [train_size, train_size, val_size, val_size], numpy_rng(data_seed, "multi-fashion-train"),
        "MultiFashion (two Fashion-MNIST training images per training or validation image)")
    left_test, right_test = _take(len(x_test), [test_size, test_size], numpy_rng(data_seed, "multi-fashion-test"),
                                  "MultiFashion (two Fashion-MNIST test images per test image)")
    # _take sorts each index set; pair them in a seeded random order, so that a pair's classes are independent
    rng = numpy_rng(data_seed, "multi-fashion-pairs")
    right_train, right_val, right_test = (rng.permutation(r) for r in (right_train, right_val, right_test))
    sources = {"train": (x_train, y_train, left_train, right_train), "val": (x_train, y_train, left_val, right_val),
               "test": (x_test, y_test, left_test, right_test)}
    images = [compose(x[left], x[right], offset) for x, _, left, right in sources.values()]
    inputs, normalization = _standardise(images)
    splits = {split: Examples(x, {"left": torch.from_numpy(y[left]), "right": torch.from_numpy(y[right])})
              for x, (split, (_, y, left, right)) in zip(inputs, sources.items())}
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "offset": offset,
            "data_seed": data_seed, "data_root": str(root), "files_md5": train_md5 | test_md5,
            "normalization": normalization}
    return single_input_data(list(tasks), splits, info)
