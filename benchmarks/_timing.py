"""Wall-clock timing on the CPU or a GPU, shared by the benchmark scripts."""
from __future__ import annotations

import platform
import time

import torch


def sync(device: torch.device) -> None:
    """Device work is asynchronous: finish it before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, n: int = 1) -> float:
    """Mean wall seconds of n calls of fn, device work included."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n


def machine(device: torch.device) -> str:
    """What ran the benchmark, for its header."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
