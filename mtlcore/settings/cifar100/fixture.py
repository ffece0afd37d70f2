"""Small files in exactly the CIFAR-100 release's python format, for machines without the real data.

The real loader reads them like the release (tests, and the smoke profile, which proves the whole pipeline on
them). They are noise with a class-placed bright block: the numbers a run gives on them say nothing about
CIFAR-100.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mtlcore.settings.cifar100 import data

TEST_ID_OFFSET = 10_000  # test images are numbered from here, train images from 0


def write(root: Path, *, seed: int = 0, train_per_class: int = 12, test_per_class: int = 4,
          coarse_names: list[str] | None = None) -> dict:
    """`root/cifar-100-python/{train,test,meta}` as the release pickles them (bytes keys, uint8 N×3072 in RGB planes).

    Fine class f belongs to a seeded superclass (five each, not contiguous ids, as in the release). Each image has a
    bright block placed by its class on top of noise, and its number (train: 0..; test: 10,000..) in the first two
    red pixels, so that a test can find every loaded example in the files. Returns the written arrays:
    `coarse_of_fine` and, per split, (images N×3×32×32, fine labels)."""
    rng = np.random.default_rng(seed)
    coarse_of_fine = rng.permutation(np.repeat(np.arange(20), 5))
    folder = Path(root) / data.LAYOUT
    folder.mkdir(parents=True, exist_ok=True)
    written = {"coarse_of_fine": coarse_of_fine}
    for name, per_fine, offset in (("train", train_per_class, 0), ("test", test_per_class, TEST_ID_OFFSET)):
        fine = rng.permutation(np.repeat(np.arange(100), per_fine))
        images = rng.integers(0, 80, size=(len(fine), 3, 32, 32), dtype=np.uint8)
        for i, f in enumerate(fine):
            row, col = divmod(int(f) % 25, 5)
            images[i, int(f) % 3, 4 + 5 * row : 8 + 5 * row, 4 + 5 * col : 8 + 5 * col] = 220
        ids = np.arange(offset, offset + len(fine))
        images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
        content = {b"filenames": [f"img_{i}.png".encode() for i in ids], b"batch_label": f"{name} batch".encode(),
                   b"fine_labels": fine.tolist(), b"coarse_labels": coarse_of_fine[fine].tolist(),
                   b"data": images.reshape(len(fine), 3072)}
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        written[name] = (images, fine)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [c.encode() for c in (coarse_names or data.TASKS)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written
