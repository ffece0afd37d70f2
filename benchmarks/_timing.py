"""Wall-clock timing on the CPU or a GPU, and the trainer's step, shared by the benchmark scripts."""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from mtlcore import settings
from mtlcore.settings.base import SettingData
from mtlcore.training import RunConfig, Trainer
from mtlcore.training.trainer import resolve_device


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


def trainer(config: RunConfig | dict, data_root: str | Path | None = None, data: SettingData | None = None) -> Trainer:
    """The Trainer of `config`, built as `mtlcore.training.run` builds it (its setting's data loaded from `data_root`
    unless `data` is given)."""
    config = RunConfig.from_dict(config) if isinstance(config, dict) else config
    setting = settings.get(config.setting)
    if data is None:
        data = setting.load(config.tasks, config.setting_options, root=data_root)
    return Trainer(config, setting, data, resolve_device(config.device))


def training_step(trainer: Trainer, batch=None) -> None:
    """One iteration of `Trainer._train_epoch` without its bookkeeping (`Trainer.train_step`)."""
    trainer.train_step(batch)


def alternated(fns: dict, device: torch.device, repeats: int, n: int = 1,
               rotate: bool = True) -> list[dict[str, float]]:
    """Per repeat, the mean wall seconds of n calls of each of `fns` (name → function), timed one after the other, so
    that a method and its baseline see the same machine load. With `rotate`, repeat i starts with the i-th function
    (cyclically), so that no function always runs first in a repeat."""
    items = list(fns.items())
    rows = []
    for i in range(repeats):
        order = items[i % len(items):] + items[: i % len(items)] if rotate else items
        rows.append({name: seconds(fn, device, n) for name, fn in order})
    return rows


def median_ratio(rows: list[dict[str, float]], method: str, baseline: str) -> float:
    """The median of the per-repeat ratios method / baseline of `alternated`'s rows."""
    return statistics.median(row[method] / row[baseline] for row in rows)


def median_seconds(rows: list[dict[str, float]], name: str) -> float:
    return statistics.median(row[name] for row in rows)
