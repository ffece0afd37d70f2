"""A small Cityscapes in exactly the released layout (`data.py`), for tests and the smoke profile: the real loaders
run on it.

`write(root)` writes `root/cityscapes/{train,val}/{image,label_7,label_19,depth}/{i}.npy` (or `label/` for the 7-class
labels, LibMTL's name): random images in [0, 1] (H×W×3), labels −1..6 and −1..18 (H×W, stored as floats as the
archive may), inverse depths in (0.01, 0.5) (H×W×1) with some pixels 0 (no depth). Every map has ignored / invalid
pixels. The loader takes any size shared by every file; the model needs multiples of 8, hence the default 16×32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mtlcore.settings.cityscapes.losses import IGNORE, INVALID_DEPTH


def write(root: Path, *, seed: int = 0, train: int = 8, val: int = 4, height: int = 16, width: int = 32,
          label_folder: str = "label_7", with_19: bool = True, dtype: str = "float32") -> dict:
    """Write the fixture under `root/cityscapes/`; returns what was written: {"folder": the release folder,
    "train"/"val": {"image": n×H×W×3, "label_7": n×H×W, "label_19": n×H×W (with_19), "depth": n×H×W×1}} as arrays of
    the files' values, row i being file {i}.npy. `dtype`: the numeric type of the files (the release's may differ)."""
    if label_folder not in ("label_7", "label"):
        raise ValueError(f"label_folder={label_folder!r}; valid names: ['label_7', 'label']")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cityscapes"
    written: dict = {"folder": folder}
    for split, n in (("train", train), ("val", val)):
        arrays = {
            "image": rng.random((n, height, width, 3)).astype(dtype),
            "label_7": rng.integers(IGNORE, 7, (n, height, width)).astype(dtype),
            "depth": rng.uniform(0.01, 0.5, (n, height, width, 1)).astype(dtype),
        }
        if with_19:
            arrays["label_19"] = rng.integers(IGNORE, 19, (n, height, width)).astype(dtype)
        arrays["label_7"][:, 0, :3] = IGNORE  # every example has ignored pixels and pixels without depth
        arrays["depth"][:, -1, -3:] = INVALID_DEPTH
        arrays["depth"][rng.random((n, height, width)) < 0.1] = INVALID_DEPTH
        for name, values in arrays.items():
            target = folder / split / (label_folder if name == "label_7" else name)
            target.mkdir(parents=True, exist_ok=True)
            for i, value in enumerate(values):
                np.save(target / f"{i}.npy", value)
        written[split] = arrays
    return written
