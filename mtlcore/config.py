"""Typed run configuration: YAML loading, validation before any training, a stable content hash."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Bump when a change to training or the result schema makes old run files stale. 2: evaluation through
# mtlcore.metrics.scores; 3: fused optimizer updates; 4: J-path grads in the parameters' layout;
# 5: thread-independent input standardisation (and IMTL-G's rewrite, equal up to ~1e-12 rounding);
# 6: Fisher trace from per-parameter blocks of the vmap gradients (equal up to ~2e-7 rounding).
RESULTS_VERSION = "6"

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSS_SCALES = ("sum", "mean")
HEAD_UPDATES = ("own", "weighted")
# Fields that change where or how fast a run goes, not its numbers: left out of the content hash.
NOT_HASHED = ("device",)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid options."""


@dataclass(frozen=True)
class RunConfig:
    """One training run. `tasks` with one entry is single-task (STL), more is multi-task (MTL)."""

    tasks: tuple[str, ...]
    setting: str = "fashion_mtl"
    setting_options: dict = field(default_factory=dict)
    dropout: float = 0.5
    optimizer: str = "momentum"
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    loss_scale: str = "sum"  # the C of Eq. 2: "sum" (C = 1) or "mean" (C = K)
    aggregator: str = "uniform"
    aggregator_options: dict = field(default_factory=dict)
    head_update: str = "own"  # heads get their own task's gradient, unweighted ("own") or weighted
    metrics: dict = field(default_factory=dict)  # trajectory factors to measure and their schedule
    eval_batch_size: int = 1024
    seed: int = 0
    device: str = "auto"

    @property
    def mode(self) -> str:
        return "stl" if len(self.tasks) == 1 else "mtl"

    # -- construction and validation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
            raise ConfigError(f"unknown config key(s) {hint}; valid keys: {names}")
        if "tasks" not in values:
            raise ConfigError("config needs `tasks`: a list of task names (one for single-task training)")
        values = dict(values)
        tasks = values["tasks"]
        values["tasks"] = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        with open(path) as handle:
            return cls.from_dict(yaml.safe_load(handle) or {})

    def replace(self, **changes) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        from mtlcore.data import setting_module

        try:
            module = setting_module(self.setting)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not self.tasks:
            raise ConfigError("`tasks` is empty; give at least one task")
        bad = [t for t in self.tasks if t not in module.TASKS]
        if bad:
            raise ConfigError(f"unknown task(s) {bad} for setting {self.setting!r}; valid tasks: {list(module.TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"`tasks` repeats a task: {list(self.tasks)}")
        unknown = sorted(set(self.setting_options) - set(module.DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown setting option(s) {unknown} for {self.setting!r}; valid: {sorted(module.DEFAULTS)}")
        for key, value in self.setting_options.items():
            if key.endswith("_size") and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"setting option {key}={value!r} must be a positive integer")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss_scale", self.loss_scale, LOSS_SCALES)
        _choice("head_update", self.head_update, HEAD_UPDATES)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("eval_batch_size", self.eval_batch_size, integer=True)
        _positive("epochs", self.epochs, integer=True)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must lie in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum!r} must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
        self._validate_aggregator()
        self._validate_metrics()

    def _validate_aggregator(self) -> None:
        from mtlcore import aggregators

        try:
            aggregators.get(self.aggregator, **self.aggregator_options)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None

    def _validate_metrics(self) -> None:
        from mtlcore.metrics.schedule import validate_metrics_config

        from mtlcore.data import setting_module

        sizes = {**setting_module(self.setting).DEFAULTS, **self.setting_options}
        validate_metrics_config(self.metrics, sizes.get("train_size"))

    # -- serialisation and identity -----------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """All values with the setting's defaults filled in (what the hash covers)."""
        from mtlcore.data import setting_module

        values = self.to_dict()
        values["setting_options"] = {**setting_module(self.setting).DEFAULTS, **self.setting_options}
        return values

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["tasks"] = list(self.tasks)
        return values

    def content_hash(self) -> str:
        """Stable 16-hex-digit id of the resolved config and the results version."""
        values = {k: v for k, v in self.resolved().items() if k not in NOT_HASHED}
        text = json.dumps({"config": values, "results_version": RESULTS_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def _positive(name: str, value: Any, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ConfigError(f"{name}={value!r} must be a positive {'integer' if integer else 'number'}")
