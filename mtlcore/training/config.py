"""Typed run configuration: YAML loading, validation before any training, a stable content hash."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlcore import aggregators, settings
from mtlcore._validation import is_int, is_number, string_hint
from mtlcore.metrics import schedule

# Bump when a change to what training computes or to the result schema makes old run files stale (the history of
# each version is in CHANGELOG.md). Every run's content hash includes it, so every cached run retrains.
RESULTS_VERSION = "13"

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSS_SCALES = ("sum", "mean")
HEAD_UPDATES = ("own", "weighted")
# Fields that change where or how fast a run goes, not its numbers: left out of the content hash.
NOT_HASHED = ("device",)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it and the valid options."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file (exponent floats such as 1e-3 as numbers); a syntax error names the file."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None


@dataclass(frozen=True)
class RunConfig:
    """One training run. `tasks` with one entry is single-task (STL), more is multi-task (MTL).

    A value: validated once when built (each part by its owner: the setting its tasks, options and models, the
    aggregator registry its options, the factor schedule its metrics), never changed afterwards.
    """

    setting: str
    tasks: tuple[str, ...]
    setting_options: dict = field(default_factory=dict)
    model: str | None = None  # None: the setting's default model
    model_options: dict = field(default_factory=dict)
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
    def fields(cls) -> list[str]:
        """The keys a run config takes."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"a run config is a mapping of keys to values (tasks: [...], lr: ...), "
                              f"got a {type(values).__name__}: {values!r:.80}")
        names = cls.fields()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
            raise ConfigError(f"unknown config key(s) {hint}; valid keys: {names}")
        if "setting" not in values:
            raise ConfigError(f"config needs `setting`: one of {settings.available()}")
        if "tasks" not in values:
            raise ConfigError("config needs `tasks`: a list of task names (one for single-task training)")
        values = dict(values)
        tasks = [values["tasks"]] if isinstance(values["tasks"], str) else values["tasks"]
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"tasks={values['tasks']!r} must be a task name or a list of task names")
        values["tasks"] = tuple(tasks)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_yaml(path) or {})

    def replace(self, **changes) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        try:
            setting = settings.get(self.setting)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("setting_options", "model_options", "aggregator_options", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a mapping of names to values")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model={self.model!r} must be a model name of setting {self.setting!r}, "
                              f"one of {sorted(setting.models)}")
        if "generator" in self.aggregator_options:
            raise ConfigError("aggregator_options.generator: the trainer seeds a randomised method's generator from "
                              "`seed`; leave it out")
        try:
            setting.check_tasks(self.tasks)
            options = setting.resolve_options(self.setting_options)
            setting.resolve_model(self.model, self.model_options)
            aggregator = aggregators.get(self.aggregator, **self.aggregator_options)
            aggregator.reset(len(self.tasks))  # e.g. fixed weights, one per task: refused before any run trains
            schedule.validate_metrics_config(self.metrics, setting.train_size(options))
            train_size = setting.train_size(options)
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss_scale", self.loss_scale, LOSS_SCALES)
        _choice("head_update", self.head_update, HEAD_UPDATES)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size, integer=True)
        if train_size and self.batch_size > train_size:
            raise ConfigError(f"batch_size={self.batch_size} is larger than the training set ({train_size} examples "
                              f"per task); use batch_size <= {train_size} or a larger setting_options.train_size")
        _positive("eval_batch_size", self.eval_batch_size, integer=True)
        _positive("epochs", self.epochs, integer=True)
        for name, low, high in (("momentum", 0, 1), ("weight_decay", 0, math.inf)):
            value = getattr(self, name)
            if not is_number(value) or not low <= value < high:
                raise ConfigError(f"{name}={value!r} must be a number in [{low}, {high}){string_hint(value)}")
        if not is_int(self.seed, 0):
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ConfigError(f"device={self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")

    # -- serialisation and identity -----------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """All values with every default filled in (what the hash covers), so that spelling a default out does
        not train the same run twice."""
        setting = settings.get(self.setting)
        values = self.to_dict()
        values["setting_options"] = setting.resolve_options(self.setting_options)
        values["model"], values["model_options"] = setting.resolve_model(self.model, self.model_options)
        # Uniform without options takes the trainer's fast path (one backward), with options the aggregator's: kept
        # apart.
        if self.aggregator != "uniform" or self.aggregator_options:
            values["aggregator_options"] = aggregators.get(self.aggregator, **self.aggregator_options).options
        factors = self.metrics.get("factors", [])
        # No factors: nothing is measured. Otherwise the options of unmeasured factors do not matter either.
        values["metrics"] = {k: v for k, v in schedule.resolve(self.metrics).items()
                             if k not in schedule.FACTORS or k in factors} if factors else {}
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
    if not (is_int(value, 1) if integer else is_number(value) and value > 0):
        raise ConfigError(f"{name}={value!r} must be a positive {'integer' if integer else 'finite number'}"
                          f"{string_hint(value)}")
