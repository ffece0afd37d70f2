"""Stable seeds derived from (seed, names): never Python's salted `hash()`."""
from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, *names: str | int) -> int:
    """A 63-bit seed that depends only on `seed` and `names` (stable across processes)."""
    keys = [int(seed)] + [zlib.crc32(str(n).encode()) for n in names]
    return int(np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0]) >> 1


def numpy_rng(seed: int, *names: str | int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *names))


def torch_generator(seed: int, *names: str | int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *names))
    return generator
