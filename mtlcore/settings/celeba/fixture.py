"""Small files in exactly CelebA's released formats, for machines without the real data.

Real 178×218 JPEGs, `list_attr_celeba.txt` (the count line, the 40 attribute names, lines of 1/-1 with double
spaces) and `list_eval_partition.txt`. The real loader reads them like the release (tests, and the smoke profile,
which proves the whole pipeline on them). The attributes are drawn at random: the numbers a run gives on these
files say nothing about CelebA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtlcore.settings.celeba import data

PARTITION_PATTERN = (0, 0, 1, 0, 2)  # train, train, valid, train, test: interleaved, 3 : 1 : 1


def partition_codes(n_images: int) -> np.ndarray:
    """The partition code (0 train, 1 valid, 2 test) of each written image, in file order."""
    return np.resize(np.array(PARTITION_PATTERN, dtype=np.int8), n_images)


def write(folder: Path, *, seed: int = 0, n_images: int = 30, newline: str = "\n") -> tuple[list[str], np.ndarray]:
    """The release's files in `folder` (torchvision's root/celeba/): distinct JPEGs, the two list files. Returns the
    image names and their attribute values (1 / -1), one row per image."""
    if n_images < 1:
        raise ValueError(f"n_images={n_images} must be at least 1")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    names = [f"{i:06d}.jpg" for i in range(1, n_images + 1)]
    (folder / data.IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        pixels = np.empty((218, 178, 3), dtype=np.uint8)
        pixels[...] = rng.integers(30, 220, size=3, dtype=np.uint8)  # a colour per image
        k = i % 30  # and a block of another colour, placed by its number
        pixels[30 + 5 * k : 60 + 5 * k, 20 + 3 * k : 90 + 3 * k] = rng.integers(0, 256, size=3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / data.IMAGE_FOLDER / name, quality=95)
    values = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_images, 40))
    lines = [str(n_images), " ".join(data.TASKS) + " "]
    lines += [name + "".join(f" {v:2d}" for v in row) for name, row in zip(names, values)]  # "-1  1 -1  1"
    (folder / data.ATTR_FILE).write_bytes((newline.join(lines) + newline).encode())
    partition = [f"{name} {code}" for name, code in zip(names, partition_codes(n_images))]
    (folder / data.PARTITION_FILE).write_bytes((newline.join(partition) + newline).encode())
    return names, values
