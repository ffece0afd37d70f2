"""FashionMTL's data (paper A, Appendix A): Fashion1, Fashion2, NoisyFashion, NotMNIST.

Fashion1 and Fashion2 are disjoint parts of Fashion-MNIST's training split (validation sets too) and of
its test split; NoisyFashion is Fashion2's images with their labels shuffled by a seeded permutation (pure
noise to memorise); NotMNIST holds letters A–J. Every split is a pure function of `data_seed` and the sizes,
whichever tasks a run asks for, so STL and MTL runs see the same Fashion1 data.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import Examples, SettingData
from mtlcore.settings.locate import cached_reads, DataNotFoundError, data_root, find_files, missing_data_message, read_idx_and_md5

log = logging.getLogger(__name__)

TASKS = ("fashion1", "fashion2", "noisy_fashion", "notmnist")

FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
FASHION_LAYOUTS = ["fashion-mnist", "FashionMNIST/raw", "fashion_mnist"]
# MD5 of the release's decompressed files (data MANIFEST; torchvision checks the .gz files' MD5s)
FASHION_MD5 = {"train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
               "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
               "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
               "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965"}
NOTMNIST_TEST_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
NOTMNIST_TRAIN_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
NOTMNIST_LAYOUTS = ["notmnist", "notMNIST"]
NOTMNIST_URL = "https://github.com/davidflanagan/notMNIST-to-MNIST/raw/master/"


def fashion_mnist_folder(root: Path, download: bool = True) -> Path:
    folder = find_files(root, FASHION_LAYOUTS, FASHION_FILES)
    if folder is None and download:
        try:
            import torchvision

            log.info("Fashion-MNIST not found under %s; downloading with torchvision", root)
            torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        except Exception as error:  # offline, proxy, disk: report below with the full instructions
            log.warning("Fashion-MNIST download failed: %s", error)
        folder = find_files(root, FASHION_LAYOUTS, FASHION_FILES)
    if folder is None:
        raise DataNotFoundError(missing_data_message(
            "Fashion-MNIST", FASHION_FILES, root, FASHION_LAYOUTS,
            "run `mtlcore data fashion_mtl` on a machine with internet (torchvision downloads them into "
            f"{root / 'FashionMNIST/raw'}), or copy the four .gz files from "
            "https://github.com/zalandoresearch/fashion-mnist/tree/master/data/fashion into "
            f"{root / 'fashion-mnist'}."))
    return folder


def notmnist_folder(root: Path, download: bool = True) -> Path:
    folder = find_files(root, NOTMNIST_LAYOUTS, NOTMNIST_TEST_FILES)
    if folder is None and download:
        try:
            _download_notmnist(root / NOTMNIST_LAYOUTS[0])
        except Exception as error:
            log.warning("notMNIST download failed: %s", error)
        folder = find_files(root, NOTMNIST_LAYOUTS, NOTMNIST_TEST_FILES)
    if folder is None:
        raise DataNotFoundError(missing_data_message(
            "notMNIST (MNIST format)", NOTMNIST_TEST_FILES + [f"optionally {n}" for n in NOTMNIST_TRAIN_FILES],
            root, NOTMNIST_LAYOUTS,
            f"download the .gz files from {NOTMNIST_URL} (github.com/davidflanagan/notMNIST-to-MNIST) into "
            f"{root / 'notmnist'}; `mtlcore data fashion_mtl` does it on a machine with internet."))
    return folder


def _download_notmnist(folder: Path) -> None:
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    for name in NOTMNIST_TEST_FILES + NOTMNIST_TRAIN_FILES:
        target = folder / name
        if not target.exists():
            log.info("downloading %s", NOTMNIST_URL + name)
            tmp = target.with_name(target.name + ".part")
            urllib.request.urlretrieve(NOTMNIST_URL + name, tmp)  # noqa: S310 (fixed https URL)
            tmp.replace(target)


@cached_reads(maxsize=8)
def _read_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Images, int64 labels, and the files' MD5s by `folder/name` (recorded with every run)."""
    (x, x_md5), (y, y_md5) = read_idx_and_md5(images), read_idx_and_md5(labels)
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x, y.astype(np.int64), {f"{images.parent.name}/{images.name}": x_md5, f"{labels.parent.name}/{labels.name}": y_md5}


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The cached arrays, shared by every later load in the process: made read-only so no caller can change them."""
    for array in arrays:
        array.setflags(write=False)
    return arrays


@cached_reads(maxsize=8)
def _read_fashion(folder: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    x, y, md5 = _read_pair(folder / images, folder / labels)
    for name in (images, labels):
        found = md5[f"{folder.name}/{name}"]
        if found != FASHION_MD5[name]:  # warned once per process: splits and results differ
            log.warning("%s is not the Fashion-MNIST release (MD5 of its decompressed bytes %s, the release's %s): "
                        "its splits and results are not comparable with other machines'", folder / name, found,
                        FASHION_MD5[name])
    return *_read_only(x, y), md5


@cached_reads(maxsize=4)
def _distinct_images(folder: Path, with_train: bool) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """notMNIST's t10k images (then its train files' if `with_train`), the first copy of each distinct image in
    file order with its label, and the files' MD5s. Cached: every run of a sweep loads the same pool.

    The t10k file holds 9,804 distinct images among its 10,000 (one blank image 141 times): split by index,
    copies of a training image landed in the validation and test sets.
    """
    files = NOTMNIST_TEST_FILES + (NOTMNIST_TRAIN_FILES if with_train else [])
    parts = [_read_pair(folder / files[i], folder / files[i + 1]) for i in range(0, len(files), 2)]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    rows = np.ascontiguousarray(x.reshape(len(x), -1))
    _, first = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))).ravel(), return_index=True)
    first.sort()
    return *_read_only(x[first], y[first]), {name: md5 for p in parts for name, md5 in p[2].items()}


def _notmnist_pool(folder: Path, needed: int, download: bool) -> tuple[np.ndarray, np.ndarray, str, dict[str, str]]:
    """The distinct t10k images, and the train files' after them only when t10k holds fewer than `needed`.

    Also returns a description of the pool and the files' MD5s. The pool depends on the sizes alone, never on
    whether the optional train files happen to be present: otherwise a download would silently change the splits
    of runs already cached under the same hash.
    """
    x, y, md5 = _distinct_images(folder, with_train=False)
    if needed <= len(x):
        return x, y, f"t10k ({len(x)} distinct images)", md5
    if find_files(folder, ["."], NOTMNIST_TRAIN_FILES) is None and download:
        try:
            _download_notmnist(folder)
        except Exception as error:
            log.warning("notMNIST download failed: %s", error)
    if find_files(folder, ["."], NOTMNIST_TRAIN_FILES) is None:
        raise DataNotFoundError(
            f"notMNIST: train_size + val_size + test_size = {needed} examples need the training files "
            f"{NOTMNIST_TRAIN_FILES} next to the t10k files in {folder} (these hold only {len(x)} distinct images); "
            f"download them from {NOTMNIST_URL}, or lower the sizes to at most {len(x)} in all.")
    x, y, md5 = _distinct_images(folder, with_train=True)  # t10k's copies come first
    return x, y, f"t10k+train ({len(x)} distinct images)", md5


def missing_optional_files(root: Path) -> list[str]:
    """What `mtlcore data` should mention: notMNIST's train files, needed only beyond the t10k file's size."""
    folder = notmnist_folder(root, download=False)
    if find_files(folder, ["."], NOTMNIST_TRAIN_FILES) is not None:
        return []
    return [f"notMNIST {NOTMNIST_TRAIN_FILES} in {folder}: needed when train_size + val_size + test_size exceeds "
            f"the distinct images of the t10k file (9,804 in the release; the paper profile needs 35,000); download them from {NOTMNIST_URL}"]


def _take(pool: int, sizes: list[int], rng: np.random.Generator, what: str) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes from range(pool)."""
    if sum(sizes) > pool:
        raise ValueError(f"{what}: asked for {' + '.join(map(str, sizes))} = {sum(sizes)} examples but only "
                         f"{pool} exist; lower train_size/val_size/test_size")
    order = rng.permutation(pool)
    bounds = np.cumsum([0] + sizes)
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _standardise(images: list[np.ndarray]) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """Scale to [0, 1], then standardise by the training images' mean and population std (the first array)."""
    if any(im.dtype != np.uint8 for im in images):
        raise ValueError(f"expected 8-bit images (IDX ubyte), got {[str(im.dtype) for im in images]}")
    scaled = [torch.from_numpy(im.astype(np.float32) / 255.0).unsqueeze(1) for im in images]
    # From the pixel histogram in float64, rounded once: a float32 torch sum is split over threads and rounds
    # differently per thread count, which made the inputs (and every run) depend on the machine.
    # torch's bincount reads the uint8 pixels as they are (numpy's copies them as 8-byte integers first).
    counts = torch.bincount(torch.from_numpy(images[0].reshape(-1)), minlength=256).double().numpy()
    values = (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(np.float64)  # the scaled pixel values
    mean64 = counts @ values / counts.sum()
    std64 = np.sqrt(counts @ (values - mean64) ** 2 / counts.sum())  # population std: divides by N (torch.std by N − 1)
    mean, std = torch.tensor(mean64, dtype=torch.float32), torch.tensor(max(std64, 1e-6), dtype=torch.float32)
    return [(im - mean) / std for im in scaled], (float(mean), float(std))


def _task(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[dict[str, Examples], tuple[float, float]]:
    """The train, val and test examples of one task, standardised by its training images, and the (mean, std) used."""
    xs, normalization = _standardise(images)
    return {split: Examples(x, torch.from_numpy(np.ascontiguousarray(y)))
            for split, x, y in zip(("train", "val", "test"), xs, labels)}, normalization


def load(tasks: list[str], train_size: int = 25_000, val_size: int = 5_000, test_size: int = 5_000,
         data_seed: int = 0, root: str | Path | None = None, download: bool = True) -> SettingData:
    """Load the FashionMTL tasks in `tasks` (any of TASKS) with `*_size` examples per task and split."""
    root = data_root(root)
    out: dict[str, tuple[dict[str, Examples], tuple[float, float]]] = {}
    files_md5: dict[str, str] = {}
    if any(t != "notmnist" for t in tasks):
        folder = fashion_mnist_folder(root, download)
        x_train, y_train, train_md5 = _read_fashion(folder, *FASHION_FILES[:2])
        x_test, y_test, test_md5 = _read_fashion(folder, *FASHION_FILES[2:])
        files_md5.update(train_md5 | test_md5)
        train1, train2, val1, val2 = _take(len(x_train), [train_size, train_size, val_size, val_size],
                                           numpy_rng(data_seed, "fashion-train-split"), "Fashion-MNIST train split")
        test1, test2 = _take(len(x_test), [test_size, test_size], numpy_rng(data_seed, "fashion-test-split"),
                             "Fashion-MNIST test split")
        parts = {"fashion1": (train1, val1, test1), "fashion2": (train2, val2, test2)}
        for task in tasks:
            if task == "notmnist":
                continue
            train, val, test = parts["fashion1" if task == "fashion1" else "fashion2"]
            images = [x_train[train], x_train[val], x_test[test]]
            labels = [y_train[train], y_train[val], y_test[test]]
            if task == "noisy_fashion":
                # Shuffle labels across examples: the images keep no information about their labels.
                labels = [lab[numpy_rng(data_seed, "noisy-labels", split).permutation(len(lab))]
                          for lab, split in zip(labels, ("train", "val", "test"))]
            out[task] = _task(images, labels)
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "data_seed": data_seed,
            "data_root": str(root)}
    if "notmnist" in tasks:
        needed = train_size + val_size + test_size
        x_pool, y_pool, info["notmnist_pool"], md5 = _notmnist_pool(notmnist_folder(root, download), needed, download)
        files_md5.update(md5)
        train, val, test = _take(len(x_pool), [train_size, val_size, test_size],
                                 numpy_rng(data_seed, "notmnist-split"), f"notMNIST (found under {root})")
        out["notmnist"] = _task([x_pool[train], x_pool[val], x_pool[test]], [y_pool[train], y_pool[val], y_pool[test]])
    info["files_md5"] = files_md5  # provenance: a run file records exactly which data it was trained on
    info["normalization"] = {t: out[t][1] for t in tasks}  # inputs are (raw/255 - mean) / std
    examples = {split: {t: out[t][0][split] for t in tasks} for split in ("train", "val", "test")}
    return SettingData(list(tasks), examples, info=info)
