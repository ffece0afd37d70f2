"""Cityscapes's data (paper A, Appendix A): the 128×256 preprocessing of MTAN (Liu et al. 2019), which LibMTL and the
SMTO papers use, with a semantic label (7 classes, or 19) and an inverse depth per pixel of the same image.

The release, under `root/cityscapes/` (or directly in the data root), for each of its splits `train` (2,975 images) and
`val` (500):
- `image/{i}.npy`: H×W×3 floats in [0, 1] (128×256 in the release);
- `label_7/{i}.npy` (LibMTL names the folder `label/`): H×W class indices 0–6, −1 where a pixel is unlabelled;
  `label_19/{i}.npy` the same with 19 classes (setting option `classes: 19`);
- `depth/{i}.npy`: H×W×1 inverse depths, 0 where a pixel has none.
Files are numbered 0..n−1 in each folder; their numeric type is whatever the archive holds (labels may be floats).

Splits: the release's `val` is the test split (as in MTAN and LibMTL; Cityscapes's own test labels are not public);
the validation split is held out from the release's `train`: a permutation of its images drawn from `data_seed` gives
the first `val_size` to validation and the next `train_size` to training, so a smaller `train_size` keeps a subset of
a larger one's images and the same validation images. `test_size` below 500 takes a seeded subset of `val`. Each
split keeps its images in file order; `info["files"]` lists the file number of every example.

Loading stacks the selected files once into N×3×H×W float32 images, N×H×W int8 labels and N×1×H×W float32 depths
(the loss reads labels as integers), checking every file's shape and labels; nothing is decoded again during
training. All images of both splits must share one size H×W (the model needs multiples of 8).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import SPLITS, Examples, SettingData, single_input_data
from mtlcore.settings.cityscapes.losses import IGNORE
from mtlcore.settings.locate import DataNotFoundError, data_root, missing_data_message

TASKS = ("segmentation", "depth")
LAYOUTS = ["cityscapes", "."]
RELEASE_SIZES = {"train": 2_975, "val": 500}  # the preprocessed archive's folders
SOURCE = {"train": "train", "val": "train", "test": "val"}  # our split -> the release's folder
LABEL_FOLDERS = {7: ("label_7", "label"), 19: ("label_19",)}
MTAN = "https://github.com/lorenmt/mtan"
ARCHIVE = "https://www.dropbox.com/sh/gaw6vh6qusoyms6/AADwWi0Tp3E3M4B2xzeGlsEna?dl=0"
_NUMBERED = re.compile(r"^(\d+)\.npy$")


def how_to_get(root: Path) -> str:
    return (f"download the preprocessed Cityscapes (128×256, 651 MB) linked from the MTAN repository's README "
            f"({MTAN}): {ARCHIVE} (LibMTL's examples use the same archive), and extract it into "
            f"{root / 'cityscapes'} so that {root / 'cityscapes' / 'train' / 'image' / '0.npy'} exists. There is no "
            "automatic download.")


def _release_names(classes: int) -> list[str]:
    first, *others = LABEL_FOLDERS[classes]
    names = []
    for split in RELEASE_SIZES:
        labels = f"{split}/{first}/{{i}}.npy" + "".join(f" (or {split}/{name}/{{i}}.npy)" for name in others)
        names += [f"{split}/image/{{i}}.npy", labels, f"{split}/depth/{{i}}.npy"]
    return names


def cityscapes_folder(root: Path, classes: int = 7) -> Path:
    """The folder under `root` that holds the release (`train/image/` and `val/image/`); DataNotFoundError otherwise."""
    for layout in LAYOUTS:
        folder = root / layout
        if all((folder / split / "image").is_dir() for split in RELEASE_SIZES):
            return folder.resolve()
    raise DataNotFoundError(missing_data_message("Cityscapes (preprocessed)", _release_names(classes), root, LAYOUTS,
                                                 how_to_get(root)))


def _numbers(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for m in map(_NUMBERED.match, (p.name for p in folder.iterdir())) if m}


def label_folder(root: Path, folder: Path, split: str, classes: int) -> Path:
    for name in LABEL_FOLDERS[classes]:
        if (folder / split / name).is_dir():
            return folder / split / name
    searched = ", ".join(str(folder / split / name) for name in LABEL_FOLDERS[classes])
    raise DataNotFoundError(f"Cityscapes {classes}-class labels not found: none of the folders {searched} exists. "
                            f"How to get them: {how_to_get(root)}")


def count_images(folder: Path, split: str) -> int:
    """How many images the release's `split` holds: files 0..n−1 of `image/` (a gap is an incomplete extraction)."""
    numbers = _numbers(folder / split / "image")
    if not numbers:
        raise DataNotFoundError(f"{folder / split / 'image'} holds no numbered .npy file ({{i}}.npy); extract the "
                                f"archive again ({ARCHIVE})")
    n = max(numbers) + 1
    gaps = sorted(set(range(n)) - numbers)
    if gaps:
        raise DataNotFoundError(f"{folder / split / 'image'} holds {len(numbers)} numbered .npy files, not every "
                                f"one of 0..{n - 1}.npy: missing {[f'{i}.npy' for i in gaps[:5]]}; an incomplete "
                                f"extraction? Extract the archive again ({ARCHIVE})")
    return n


def _check_present(folder: Path, numbers: np.ndarray) -> None:
    present = _numbers(folder)
    missing = [f"{i}.npy" for i in numbers.tolist() if i not in present]
    if missing:
        raise DataNotFoundError(f"{len(missing)} file(s) missing from {folder}: {missing[:5]}; an incomplete "
                                f"extraction? Extract the archive again ({ARCHIVE})")


def _read(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # cut short, empty, or not .npy at all
        raise ValueError(f"{path} could not be read as .npy ({type(error).__name__}: {error}): a truncated or corrupt "
                         f"file? Extract it again from the archive ({ARCHIVE})") from error


def _expect(path: Path, array: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
    if array.shape not in shapes:
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected {' or '.join(map(str, shapes))} "
                         "(every image, label and depth map of the release has the same height and width)")


def read_split(folder: Path, numbers: np.ndarray, labels_folder: Path | None, with_depth: bool, size: tuple | None,
               classes: int) -> dict[str, np.ndarray]:
    """The files `numbers` of a release split stacked: images (N×3×H×W float32), and where asked labels (N×H×W int8)
    and depths (N×1×H×W float32). `size`: the (H, W) every file must have (None: the first image's)."""
    images_folder, depth_folder = folder / "image", folder / "depth"  # `load` checked that every file is there
    out: dict[str, np.ndarray] = {}
    for row, number in enumerate(numbers.tolist()):
        path = images_folder / f"{number}.npy"
        image = _read(path)
        if size is None:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"{path} holds an array of shape {image.shape}; expected H×W×3 (an RGB image)")
            size = image.shape[:2]
        _expect(path, image, [(*size, 3)])
        if not out:
            out["images"] = np.empty((len(numbers), 3, *size), dtype=np.float32)
            if labels_folder is not None:
                out["labels"] = np.empty((len(numbers), *size), dtype=np.int8)
            if with_depth:
                out["depths"] = np.empty((len(numbers), 1, *size), dtype=np.float32)
        out["images"][row] = np.moveaxis(np.asarray(image, dtype=np.float32), -1, 0)
        if labels_folder is not None:
            path = labels_folder / f"{number}.npy"
            label = _read(path)
            _expect(path, label, [tuple(size)])
            values = np.asarray(label)
            bad = ~((values == IGNORE) | ((values >= 0) & (values < classes))) | (values != np.round(values))
            if bad.any():
                raise ValueError(f"{path} holds labels {np.unique(values[bad])[:5].tolist()} outside -1 (ignored) and "
                                 f"0..{classes - 1}: not {classes}-class labels?")
            out["labels"][row] = values
        if with_depth:
            path = depth_folder / f"{number}.npy"
            depth = _read(path)
            _expect(path, depth, [(*size, 1), tuple(size)])
            values = np.asarray(depth, dtype=np.float32).reshape(size)
            if not np.isfinite(values).all():
                raise ValueError(f"{path} holds non-finite depths; the release marks pixels without depth by 0")
            out["depths"][row, 0] = values
    return out


def select(counts: dict[str, int], sizes: dict[str, int], data_seed: int, folder: Path) -> dict[str, np.ndarray]:
    """The file numbers (ascending) of each split: validation and training held out from the release's `train` by a
    permutation drawn from `data_seed`, test from its `val` (all of it, or a seeded subset)."""
    if sizes["train"] + sizes["val"] > counts["train"]:
        raise ValueError(f"train_size + val_size = {sizes['train']} + {sizes['val']} = {sizes['train'] + sizes['val']} "
                         f"exceed the {counts['train']} images of {folder / 'train'}; lower them")
    if sizes["test"] > counts["val"]:
        raise ValueError(f"test_size={sizes['test']} exceeds the {counts['val']} images of {folder / 'val'} (the test "
                         f"split); set test_size <= {counts['val']}")
    order = numpy_rng(data_seed, "cityscapes", "holdout").permutation(counts["train"])
    chosen = {"val": order[: sizes["val"]], "train": order[sizes["val"] : sizes["val"] + sizes["train"]],
              "test": numpy_rng(data_seed, "cityscapes", "test").permutation(counts["val"])[: sizes["test"]]}
    return {split: np.sort(numbers).astype(np.int64) for split, numbers in chosen.items()}


def load(tasks: list[str], train_size: int, val_size: int, test_size: int, data_seed: int = 0, classes: int = 7,
         root: str | Path | None = None) -> SettingData:
    """The Cityscapes tasks in `tasks` (checked by the setting) with the (resolved) setting options."""
    root = data_root(root)
    folder = cityscapes_folder(root, classes)
    counts = {split: count_images(folder, split) for split in RELEASE_SIZES}
    numbers = select(counts, {"train": train_size, "val": val_size, "test": test_size}, data_seed, folder)
    labels = ({split: label_folder(root, folder, split, classes) for split in RELEASE_SIZES}
              if "segmentation" in tasks else {})
    for split, count in counts.items():  # every file of the tasks' folders, not only the selected ones
        for where in (labels.get(split), folder / split / "depth" if "depth" in tasks else None):
            if where is not None:
                _check_present(where, np.arange(count))
    splits, size = {}, None
    for split in SPLITS:
        source = SOURCE[split]
        arrays = read_split(folder / source, numbers[split], labels.get(source), "depth" in tasks, size, classes)
        size = arrays["images"].shape[-2:]  # every split holds at least one image (sizes are positive)
        targets = {"segmentation": arrays.get("labels"), "depth": arrays.get("depths")}
        splits[split] = Examples(torch.from_numpy(arrays["images"]),
                                 {task: torch.from_numpy(targets[task]) for task in tasks})
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "data_seed": data_seed,
            "classes": classes, "data_root": str(root), "folder": str(folder), "image_size": list(size),
            "release_sizes": counts, "source": dict(SOURCE),
            "label_folder": {split: str(path) for split, path in labels.items()},
            "files": {split: numbers[split].tolist() for split in SPLITS}}
    return single_input_data(tasks, splits, info)


def missing_optional_files(root: Path) -> list[str]:
    """The 19-class labels, needed only by setting option classes=19."""
    folder = cityscapes_folder(root)
    missing = [str(folder / split / "label_19") for split in RELEASE_SIZES
               if not (folder / split / "label_19").is_dir()]
    return [f"{', '.join(missing)}: the 19-class labels, needed only by setting option classes=19"] if missing else []
