"""Wall-clock timing on the CPU or a GPU, and the trainer's step, shared by the benchmark scripts."""
from __future__ import annotations

import platform
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
