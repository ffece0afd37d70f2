"""Shared fixtures: a data root of small files in exactly the released IDX formats, and the real one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcore.settings.locate import write_idx

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def same_global_rng_for_every_test():
    """Tests that draw from torch's global generator see the same numbers alone, in any order and under
    pytest-xdist, so a failure reproduces with `pytest -k <its name>`."""
    torch.manual_seed(0)


def _images(labels: np.ndarray, rng: np.random.Generator, offset: int) -> np.ndarray:
    """Learnable images (a bright class-dependent block plus noise) that are all distinct: the example
    number is written into the first three pixels, so disjointness is checkable on the images."""
    n = len(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 4 + 10 * row : 12 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 230
    ids = np.arange(offset, offset + n)
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = ids % 256, (ids // 256) % 256, ids // 65536
    return images


def write_fake_mnist_folder(folder: Path, n_train: int, n_test: int, seed: int, with_train: bool = True) -> None:
    rng = np.random.default_rng(seed)
    parts = [("t10k", n_test, 10**6)] + ([("train", n_train, 0)] if with_train else [])
    for prefix, n, offset in parts:
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", _images(labels, rng, offset + seed * 10**5))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture(scope="session")
def fake_data_root(tmp_path_factory) -> Path:
    """Fashion-MNIST (1,200 train / 400 test) and notMNIST (600 t10k only), in the shared data layout."""
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist_folder(root / "fashion-mnist", 1200, 400, seed=1)
    write_fake_mnist_folder(root / "notmnist", 0, 600, seed=2, with_train=False)
    return root


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    root = Path(os.environ.get("MTLCORE_DATA_DIR") or REAL_DATA)
    if not (root / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not found under {root} (set MTLCORE_DATA_DIR)")
    return root


SMALL = {"train_size": 200, "val_size": 100, "test_size": 100, "data_seed": 0}


@pytest.fixture
def no_compiler(monkeypatch):
    """The fused LeNet kernel has not been built in this test yet, and building it fails as on a machine without
    g++."""
    from torch.utils import cpp_extension

    from mtlcore.settings.fashion_mtl import fused

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(fused, "modules", {})
    monkeypatch.setattr(cpp_extension, "load", fail)


@pytest.fixture
def one_thread():
    """One torch thread for small models (a second only adds synchronisation, and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
