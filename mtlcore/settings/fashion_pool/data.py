"""FashionPool's data: many small tasks on Fashion-MNIST and notMNIST images, each with its own images.

Three kinds of task (`TASKS`): 10-way classification of Fashion-MNIST (`fashion`) or of notMNIST's letters
(`letters`); a binary task between two Fashion-MNIST classes (`tshirt_vs_shirt`, ...: label 0 for the first class,
1 for the second); and 10-way Fashion-MNIST with controlled label noise (`noisy_30`, `noisy_60`, `noisy_90`): a
seeded round(p·n) of each split's examples get a label drawn uniformly among the nine wrong classes. At p = 0.9 the
label is uniform over the ten classes whatever the image shows: pure noise, as FashionMTL's NoisyFashion.

No two tasks share an image. Fashion-MNIST's training and test files form one pool of 70,000 images (ten tasks
need more test images than the test file's 10,000), allocated for every task at once, in a fixed order, from one
seeded permutation: the 10-way tasks take the next unused images of any class, then each pair task the next unused
images of its two classes (the pairs' classes are disjoint); a task's first `train_size` images train, the next
`val_size` validate, the next `test_size` test. So every split is a pure function of `data_seed` and the sizes,
whichever tasks a run asks for: a target's data is the same alone and with any auxiliary set.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import Examples, SettingData
from mtlcore.settings.fashion_mtl import data as fashion_data
from mtlcore.settings.locate import data_root

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class PoolTask:
    """How a task's labels come from an image's original label."""

    source: str  # "fashion" or "notmnist"
    pair: tuple[int, int] | None = None  # a binary task between these two Fashion-MNIST classes
    noise: float = 0.0  # the fraction of examples (per split) whose label is replaced by a wrong class

    @property
    def classes(self) -> int:
        return 2 if self.pair else 10


TASKS = {
    "fashion": PoolTask("fashion"),
    "letters": PoolTask("notmnist"),
    "tshirt_vs_shirt": PoolTask("fashion", pair=(0, 6)),
    "pullover_vs_coat": PoolTask("fashion", pair=(2, 4)),
    "trouser_vs_dress": PoolTask("fashion", pair=(1, 3)),
    "sandal_vs_bag": PoolTask("fashion", pair=(5, 8)),
    "sneaker_vs_boot": PoolTask("fashion", pair=(7, 9)),
    "noisy_30": PoolTask("fashion", noise=0.3),
    "noisy_60": PoolTask("fashion", noise=0.6),
    "noisy_90": PoolTask("fashion", noise=0.9),
}
# The order in which Fashion-MNIST images are allocated: every 10-way task first (any class), then the pairs.
ALLOCATION_ORDER = [t for t, spec in TASKS.items() if spec.source == "fashion" and not spec.pair] + \
                   [t for t, spec in TASKS.items() if spec.pair]


def allocate(labels: np.ndarray, sizes: dict[str, int], rng: np.random.Generator, what: str) -> dict[str, np.ndarray]:
    """Disjoint index sets into one file's `labels`: `sizes[task]` images for each task of ALLOCATION_ORDER, taken in
    the order of one permutation (a pair task only from its two classes). Too few images raise, naming the sizes."""
    order = rng.permutation(len(labels))
    unused = np.ones(len(labels), dtype=bool)
    out = {}
    for task in ALLOCATION_ORDER:
        spec, n = TASKS[task], sizes[task]
        eligible = unused[order] & (np.isin(labels[order], spec.pair) if spec.pair else True)
        chosen = order[np.flatnonzero(eligible)[:n]]
        if len(chosen) < n:
            raise ValueError(f"FashionPool, {what}: task {task!r} needs {n} images but only {len(chosen)} unused ones "
                             f"remain{' of its two classes' if spec.pair else ''} after the tasks before it "
                             f"({ALLOCATION_ORDER}); lower train_size/val_size/test_size")
        unused[chosen] = False
        out[task] = chosen
    return out


def task_labels(task: str, original: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The task's labels of images whose original labels are `original`."""
    spec = TASKS[task]
    if spec.pair:
        return (original == spec.pair[1]).astype(np.int64)
    labels = original.astype(np.int64).copy()
    if spec.noise:
        flipped = rng.choice(len(labels), size=round(spec.noise * len(labels)), replace=False)
        # A wrong class drawn uniformly: the true one shifted by 1..9 (mod 10).
        labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    return labels


def load(tasks: list[str], train_size: int, val_size: int, test_size: int, data_seed: int,
         root: str | Path | None = None, download: bool = True) -> SettingData:
    """The FashionPool tasks in `tasks`, `*_size` examples per task and split."""
    root = data_root(root)
    out: dict[str, tuple[dict[str, Examples], tuple[float, float]]] = {}
    files_md5: dict[str, str] = {}
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "data_seed": data_seed,
            "data_root": str(root)}
    if any(TASKS[t].source == "fashion" for t in tasks):
        folder = fashion_data.fashion_mnist_folder(root, download)
        x_train, y_train, train_md5 = fashion_data._read_fashion(folder, *fashion_data.FASHION_FILES[:2])
        x_test, y_test, test_md5 = fashion_data._read_fashion(folder, *fashion_data.FASHION_FILES[2:])
        files_md5.update(train_md5 | test_md5)
        x_all, y_all = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
        drawn = allocate(y_all, dict.fromkeys(ALLOCATION_ORDER, train_size + val_size + test_size),
                         numpy_rng(data_seed, "pool-split"), "Fashion-MNIST (training and test files, 70,000 images)")
        bounds = np.cumsum([0, train_size, val_size, test_size])
        for task in (t for t in tasks if TASKS[t].source == "fashion"):
            parts = [np.sort(drawn[task][a:b]) for a, b in itertools.pairwise(bounds)]
            images = [x_all[i] for i in parts]
            labels = [task_labels(task, y_all[i], numpy_rng(data_seed, "pool-labels", task, split))
                      for i, split in zip(parts, ("train", "val", "test"))]
            out[task] = fashion_data._task(images, labels)
    if "letters" in tasks:
        needed = train_size + val_size + test_size
        x_pool, y_pool, info["notmnist_pool"], md5 = fashion_data._notmnist_pool(
            fashion_data.notmnist_folder(root, download), needed, download)
        files_md5.update(md5)
        train, val, test = fashion_data._take(len(x_pool), [train_size, val_size, test_size],
                                              numpy_rng(data_seed, "pool-letters-split"), f"notMNIST (under {root})")
        out["letters"] = fashion_data._task([x_pool[train], x_pool[val], x_pool[test]],
                                            [y_pool[train], y_pool[val], y_pool[test]])
    info["files_md5"] = files_md5
    info["normalization"] = {t: out[t][1] for t in tasks}  # inputs are (raw/255 - mean) / std
    examples = {split: {t: out[t][0][split] for t in tasks} for split in ("train", "val", "test")}
    return SettingData(list(tasks), examples, info=info)
