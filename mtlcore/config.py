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

# Bump when a change to training or the result schema makes old run files stale. 2: evaluation through
# mtlcore.metrics.scores; 3: fused optimizer updates; 4: J-path grads in the parameters' layout;
# 5: thread-independent input standardisation (and IMTL-G's rewrite, equal up to ~1e-12 rounding);
# 6: Fisher trace from per-parameter blocks of the vmap gradients (equal up to ~2e-7 rounding);
# 7: aggregator and metrics defaults in the hash; notMNIST's pool set by the sizes, not by the files present;
# 8: solver fixes (Nash-MTL's Newton, CAGrad's SLSQP tolerance, IMTL-G's rank, GradVac's guard, the PSD factor of
# MGDA/UPGrad/DualProj on unit gradients); 9: sharpness's step halving as the reference (ε goes on from the
# current point; with random_init the clean point is the first worst); conflict's J rows in the run's task order;
# 10: NotMNIST keeps one copy of each distinct image (other splits); DB-MTL's weighted heads; eigh via dsyev.
# 11: the Gramian from the AVX2 kernel (float64 sums in another order); GradDrop from per-sign column sums.
# 12: PCGrad, GradVac and RLW draw from a CPU generator in runs on a GPU (CPU results are unchanged, but retrain:
# the version is in every run's hash).
RESULTS_VERSION = "12"

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
        if not isinstance(values, dict):
            raise ConfigError(f"a run config is a mapping of keys to values (tasks: [...], lr: ...), "
                              f"got a {type(values).__name__}: {values!r:.80}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
            raise ConfigError(f"unknown config key(s) {hint}; valid keys: {names}")
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
        if not isinstance(self.setting_options, dict):
            raise ConfigError(f"setting_options={self.setting_options!r} must be a mapping, e.g. {{train_size: 1000}}")
        unknown = sorted(set(self.setting_options) - set(module.DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown setting option(s) {unknown} for {self.setting!r}; valid: {sorted(module.DEFAULTS)}")
        for key, value in self.setting_options.items():
            if type(module.DEFAULTS[key]) is int and not is_int(value, 1 if key.endswith("_size") else 0):
                kind = "positive" if key.endswith("_size") else "non-negative"
                raise ConfigError(f"setting option {key}={value!r} must be a {kind} integer")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss_scale", self.loss_scale, LOSS_SCALES)
        _choice("head_update", self.head_update, HEAD_UPDATES)
        _positive("lr", self.lr)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("eval_batch_size", self.eval_batch_size, integer=True)
        _positive("epochs", self.epochs, integer=True)
        for name, low, high in (("dropout", 0, 1), ("momentum", 0, 1), ("weight_decay", 0, math.inf)):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value < high:
                raise ConfigError(f"{name}={value!r} must be a number in [{low}, {high}){_string_hint(value)}")
        if not is_int(self.seed, 0):
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ConfigError(f"device={self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
        self._validate_aggregator()
        self._validate_metrics()

    def _validate_aggregator(self) -> None:
        from mtlcore import aggregators

        if not isinstance(self.aggregator_options, dict):
            raise ConfigError(f"aggregator_options={self.aggregator_options!r} must be a mapping of option names to values")
        if "generator" in self.aggregator_options:
            raise ConfigError("aggregator_options.generator: the trainer seeds a randomised method's generator from "
                              "`seed`; leave it out")
        try:
            aggregator = aggregators.get(self.aggregator, **self.aggregator_options)
            aggregator.reset(len(self.tasks))  # e.g. fixed weights, one per task: refused before any run trains
        except (ValueError, TypeError) as error:
            raise ConfigError(str(error)) from None

    def _validate_metrics(self) -> None:
        from mtlcore.metrics.schedule import validate_metrics_config

        from mtlcore.data import setting_module

        if not isinstance(self.metrics, dict):
            raise ConfigError(f"metrics={self.metrics!r} must be a mapping, e.g. {{factors: [sharpness], every: 1}}")
        sizes = {**setting_module(self.setting).DEFAULTS, **self.setting_options}
        validate_metrics_config(self.metrics, sizes.get("train_size"))

    # -- serialisation and identity -----------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """All values with the setting's defaults filled in (what the hash covers)."""
        from mtlcore.data import setting_module

        values = self.to_dict()
        values["setting_options"] = {**setting_module(self.setting).DEFAULTS, **self.setting_options}
        # Defaults filled in, so that spelling one out does not train the same run twice. Uniform without
        # options takes the trainer's fast path (one backward), with options the aggregator's: kept apart.
        if self.aggregator != "uniform" or self.aggregator_options:
            from mtlcore import aggregators

            values["aggregator_options"] = aggregators.get(self.aggregator, **self.aggregator_options).options
        from mtlcore.metrics.schedule import FACTORS, resolve

        factors = self.metrics.get("factors", [])
        # No factors: nothing is measured. Otherwise the options of unmeasured factors do not matter either.
        values["metrics"] = {k: v for k, v in resolve(self.metrics).items() if k not in FACTORS or k in factors} \
            if factors else {}
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


def is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _string_hint(value: Any) -> str:
    return f" (got the string {value!r}: quoted in YAML, or passed as text)" if isinstance(value, str) else ""


def _positive(name: str, value: Any, integer: bool = False) -> None:
    if not (is_int(value, 1) if integer else _is_number(value) and value > 0):
        raise ConfigError(f"{name}={value!r} must be a positive {'integer' if integer else 'finite number'}"
                          f"{_string_hint(value)}")
