"""CIFAR-100's data (paper A, Appendix A): 20 tasks, one per superclass, each 5-way over its fine classes.

Reads the python version of the release, `cifar-100-python/{train,test,meta}` under the data root (the folder
torchvision's `CIFAR100(root, download=True)` makes). A task's test set is the release's test images of its
five classes; its validation set is held out from its training images. Every split is a pure function of
`data_seed` and the sizes, whichever other tasks a run asks for.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import Examples, SettingData
from mtlcore.settings.locate import cached_reads, DataNotFoundError, data_root, missing_data_message

log = logging.getLogger(__name__)

# The release's coarse label names, in its order (meta's coarse_label_names): one task each.
TASKS = ("aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
         "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
         "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
         "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
         "vehicles_1", "vehicles_2")
CLASSES_PER_TASK = 5
NUM_FINE_CLASSES = 100
RELEASE_TRAIN_PER_TASK = 2_500  # 500 training and 100 test images per fine class
RELEASE_TEST_PER_TASK = 500

LAYOUT = "cifar-100-python"
FILES = ["train", "test", "meta"]
# MD5s of the release's files (torchvision's CIFAR100.train_list, test_list and meta).
RELEASE_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
               "meta": "7973b15100ade9c7d40fb424638fde48"}
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
IMAGE_SHAPE = (3, 32, 32)


def how_to_get(root: Path) -> str:
    return (f"run `python -c \"import torchvision; torchvision.datasets.CIFAR100('{root}', download=True)\"` (or "
            f"`mtlcore data cifar100`) on a machine with internet, or download {ARCHIVE_URL} and extract it into "
            f"{root} (it unpacks to {root / LAYOUT}).")


def cifar100_folder(root: Path, download: bool = True) -> Path:
    """`root/cifar-100-python` holding the train, test and meta files; downloads them with torchvision if asked."""
    folder = root / LAYOUT
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing and download:
        try:
            import torchvision

            log.info("CIFAR-100 not found under %s; downloading with torchvision", root)
            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        except Exception as error:  # offline, proxy, disk: report below with the full instructions
            log.warning("CIFAR-100 download failed: %s", error)
        missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(missing_data_message("CIFAR-100 (python version)", FILES, root, [LAYOUT],
                                                     how_to_get(root)) + f"\nMissing: {missing} in {folder}.")
    return folder


# -- reading the release's pickles -----------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """One file of the release: uint8 images N×3×32×32 (read-only), int64 fine and coarse labels, the file's MD5."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    md5: str


def _unpickle(path: Path) -> tuple[dict, str]:
    """The file's dict with str keys, and the MD5 of its bytes; a file that does not load names itself."""
    try:
        raw = path.read_bytes()
        # The release was pickled by Python 2: its str keys and names load as bytes. Pickle runs code from the file:
        # these are the data files the user placed in their data folder (torchvision loads them the same way).
        content = pickle.loads(raw, encoding="bytes")  # noqa: S301
    except Exception as error:  # truncated (EOFError, UnpicklingError), corrupt, unreadable
        raise DataNotFoundError(
            f"{path} could not be loaded as CIFAR-100's pickle ({type(error).__name__}: {error}): a truncated or "
            f"corrupt download? Delete {path.parent} and download it again: {how_to_get(path.parent.parent)}"
        ) from error
    if not isinstance(content, dict):
        raise DataNotFoundError(f"{path} holds a {type(content).__name__}, not CIFAR-100's dict; download it again: "
                                f"{how_to_get(path.parent.parent)}")
    md5 = hashlib.md5(raw).hexdigest()
    if md5 != RELEASE_MD5.get(path.name):  # warned once per file and process (the readers are cached)
        log.warning("%s is not the CIFAR-100 release (MD5 %s, the release's %s): its splits and results are not "
                    "comparable with other machines'", path, md5, RELEASE_MD5.get(path.name))
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}, md5


def _stat_key(path: Path) -> tuple[Path, int, int]:
    """A cache key that changes when the file does."""
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


@cached_reads(maxsize=4)
def _read_split_cached(path: Path, mtime_ns: int, size: int) -> Split:
    content, md5 = _unpickle(path)
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in content]
    if missing:
        raise DataNotFoundError(f"{path} lacks the key(s) {missing} of CIFAR-100's python release; download it "
                                f"again: {how_to_get(path.parent.parent)}")
    data = np.asarray(content["data"])
    fine = np.asarray(content["fine_labels"], dtype=np.int64)
    coarse = np.asarray(content["coarse_labels"], dtype=np.int64)
    n = data.shape[0] if data.ndim else 0
    shapes = (data.shape, fine.shape, coarse.shape)
    if data.dtype != np.uint8 or shapes != ((n, int(np.prod(IMAGE_SHAPE))), (n,), (n,)):
        raise DataNotFoundError(f"{path}: data {data.dtype} {data.shape}, fine labels {fine.shape}, coarse labels "
                                f"{coarse.shape}; CIFAR-100's release holds uint8 N×3072 images with N labels of each kind. "
                                f"Download it again: {how_to_get(path.parent.parent)}")
    if n and not (0 <= fine.min() <= fine.max() < NUM_FINE_CLASSES
                  and 0 <= coarse.min() <= coarse.max() < len(TASKS)):
        raise DataNotFoundError(f"{path}: labels out of range (fine {fine.min()}..{fine.max()}, coarse "
                                f"{coarse.min()}..{coarse.max()}); download it again: {how_to_get(path.parent.parent)}")
    images = data.reshape(n, *IMAGE_SHAPE)  # rows are the red, green and blue planes, each 32×32 row-major
    for array in (images, fine, coarse):
        array.setflags(write=False)  # cached: shared by every later load in the process
    return Split(images, fine, coarse, md5)


def read_split(path: Path) -> Split:
    return _read_split_cached(*_stat_key(path))


@cached_reads(maxsize=4)
def _read_meta_cached(path: Path, mtime_ns: int, size: int) -> tuple[list[str], list[str], str]:
    content, md5 = _unpickle(path)
    names = {}
    for key, count in (("fine_label_names", NUM_FINE_CLASSES), ("coarse_label_names", len(TASKS))):
        values = content.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise DataNotFoundError(f"{path}: {key} should list {count} names, found {values!r:.200}; download it "
                                    f"again: {how_to_get(path.parent.parent)}")
        names[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if tuple(names["coarse_label_names"]) != TASKS:
        raise ValueError(f"{path}: its coarse_label_names {names['coarse_label_names']} are not CIFAR-100's "
                         f"{list(TASKS)} (in this order); the tasks would be mislabelled. Download the release again: "
                         f"{how_to_get(path.parent.parent)}")
    return names["fine_label_names"], names["coarse_label_names"], md5


def read_meta(path: Path) -> tuple[list[str], list[str], str]:
    """The fine and coarse label names, and the file's MD5."""
    return _read_meta_cached(*_stat_key(path))


def fine_classes(train: Split, test: Split, folder: Path) -> dict[str, list[int]]:
    """Each task's fine label ids, ascending (its labels 0..4 in this order), from the images' label pairs."""
    pairs = np.unique(np.concatenate([np.stack([s.fine, s.coarse], 1) for s in (train, test)]), axis=0)
    fine_ids = np.unique(pairs[:, 0])
    if len(fine_ids) != len(pairs):
        ambiguous = sorted({int(f) for f in pairs[:, 0] if (pairs[:, 0] == f).sum() > 1})
        raise ValueError(f"{folder}: fine class(es) {ambiguous} appear under more than one coarse class; CIFAR-100's "
                         f"release puts each fine class in one superclass. Download it again.")
    return {task: sorted(int(f) for f, c in pairs if c == k) for k, task in enumerate(TASKS)}


# -- splits ----------------------------------------------------------------------------------------------
def split_indices(task: str, train_pool: int, test_pool: int, train_size: int, val_size: int, test_size: int,
                  data_seed: int, where: Path | str = "the release") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (ascending) of a task's train, val and test examples among its `train_pool` training and
    `test_pool` test images. Validation comes first in the seeded order, so it does not change with train_size."""
    if train_size + val_size > train_pool:
        raise ValueError(f"CIFAR-100 task {task!r}: train_size + val_size = {train_size} + {val_size} = "
                         f"{train_size + val_size} but only {train_pool} training images of its classes exist in "
                         f"{where}; lower train_size/val_size (the release holds {RELEASE_TRAIN_PER_TASK} per task)")
    if test_size > test_pool:
        raise ValueError(f"CIFAR-100 task {task!r}: test_size = {test_size} but only {test_pool} test images of its "
                         f"classes exist in {where}; lower test_size (the release holds {RELEASE_TEST_PER_TASK} per "
                         "task)")
    order = numpy_rng(data_seed, "cifar100", task, "train-val").permutation(train_pool)
    val, train = np.sort(order[:val_size]), np.sort(order[val_size : val_size + train_size])
    test = np.sort(numpy_rng(data_seed, "cifar100", task, "test").permutation(test_pool)[:test_size])
    return train, val, test


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std (float64) of uint8 images N×C×H×W scaled to [0, 1].

    From each channel's pixel histogram in float64: a float32 sum is split over threads and rounds differently per
    thread count, which would make the inputs (and every run) depend on the machine."""
    values = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float64)  # the scaled pixel values
    means, stds = [], []
    for channel in range(images.shape[1]):
        pixels = torch.from_numpy(np.ascontiguousarray(images[:, channel]).reshape(-1))
        counts = torch.bincount(pixels, minlength=256).double().numpy()
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))  # divides by N (torch.std by N − 1)
    return np.array(means), np.array(stds)


def standardise(images: list[np.ndarray]) -> tuple[list[torch.Tensor], dict[str, list[float]]]:
    """float32 inputs (raw/255 − mean) / std per channel, by the first array's (the training images') statistics."""
    mean64, std64 = channel_statistics(images[0])
    mean = torch.tensor(mean64, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(np.maximum(std64, 1e-6), dtype=torch.float32).view(1, -1, 1, 1)
    scaled = [torch.from_numpy(np.ascontiguousarray(im)).to(torch.float32) / 255.0 for im in images]
    return [(x - mean) / std for x in scaled], {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def load(tasks: list[str], train_size: int = 2_000, val_size: int = 500, test_size: int = 500, data_seed: int = 0,
         root: str | Path | None = None, download: bool = True) -> SettingData:
    """Load the CIFAR-100 tasks in `tasks` (any of TASKS) with `*_size` examples per task and split."""
    root = data_root(root)
    folder = cifar100_folder(root, download)
    fine_names, _, meta_md5 = read_meta(folder / "meta")
    train, test = read_split(folder / "train"), read_split(folder / "test")
    classes = fine_classes(train, test, folder)
    examples: dict[str, dict[str, Examples]] = {split: {} for split in ("train", "val", "test")}
    normalization, class_names = {}, {}
    for task in tasks:
        ids = classes[task]
        if len(ids) != CLASSES_PER_TASK:
            raise ValueError(f"{folder}: task {task!r} has fine classes {ids} in the files, CIFAR-100 has "
                             f"{CLASSES_PER_TASK} per superclass; download the release again")
        k = TASKS.index(task)
        label_of = np.full(NUM_FINE_CLASSES, -1, dtype=np.int64)
        label_of[ids] = np.arange(CLASSES_PER_TASK)
        train_pool, test_pool = np.flatnonzero(train.coarse == k), np.flatnonzero(test.coarse == k)
        tr, va, te = split_indices(task, len(train_pool), len(test_pool), train_size, val_size, test_size, data_seed,
                                   folder)
        rows = [(train, train_pool[tr]), (train, train_pool[va]), (test, test_pool[te])]
        inputs, normalization[task] = standardise([source.images[i] for source, i in rows])
        for split, x, (source, i) in zip(("train", "val", "test"), inputs, rows):
            examples[split][task] = Examples(x, torch.from_numpy(label_of[source.fine[i]]))
        class_names[task] = [fine_names[i] for i in ids]
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "data_seed": data_seed,
            "data_root": str(root),
            # provenance: a run file records exactly which data it was trained on
            "files_md5": {f"{LAYOUT}/train": train.md5, f"{LAYOUT}/test": test.md5, f"{LAYOUT}/meta": meta_md5},
            "normalization": normalization,  # per task and channel: inputs are (raw/255 − mean) / std
            "classes": class_names}  # each task's fine classes, its labels 0..4 in this order
    return SettingData(list(tasks), examples, info=info)


# -- augmentation ----------------------------------------------------------------------------------------
def augment(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
            fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """A random `padding`-padded crop of each image's size and a horizontal flip with probability ½ (the usual CIFAR
    augmentation), for a batch N×C×H×W, drawn from `generator` only.

    The padding is `fill` (a number, or one value per channel). The inputs are standardised, so 0 pads with the
    training images' mean colour; torchvision's pipeline (crop, then normalise) pads with black, −mean/std per channel
    (`info["normalization"]` of the task).
    """
    n, c, h, w = images.shape
    draws = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    draws, flips = draws.to(images.device), flips.to(images.device)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    padded = fill.reshape(1, -1, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = images
    rows = draws[:, :1] + torch.arange(h, device=images.device)  # N×H
    cols = draws[:, 1:] + torch.arange(w, device=images.device)  # N×W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
