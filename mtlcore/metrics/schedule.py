"""Trajectory factors measured during training: which, when, on what data, within what budget.

A run's `metrics:` config, e.g. ``{"factors": ["sharpness", "fisher_trace"], "every": 1}``. Factors are
measured at epoch 0 and every `every` epochs on the first `examples` training examples of each task,
inside `torch.random.fork_rng`, so that measuring never changes the training trajectory.
"""
from __future__ import annotations

import copy
import difflib
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from mtlcore.metrics.coherence import gradient_coherence, multitask_gradient_coherence
from mtlcore.metrics.conflict import gradient_conflict
from mtlcore.metrics.fisher import fisher_trace
from mtlcore.metrics.sharpness import sharpness

log = logging.getLogger(__name__)

FACTORS = ("sharpness", "fisher_trace", "coherence", "conflict")
DEFAULTS = {
    "factors": [],
    "every": 1,  # epochs between measurements; epoch 0 is always measured
    "examples": 2048,  # S_k: the first `examples` training examples of each task (fixed, REFERENCE §1.3)
    "budget_seconds": None,  # stop measuring once the run has spent this long on measurements
    "sharpness": {"rho": 1e-3, "batch_size": 128},
    "fisher_trace": {"empirical": False},
    "coherence": {"small_batch": 16, "large_batch": 1024},
    "conflict": {"num_batches": 200},
}
# Variables each factor fills in the run dataset (per epoch and task unless noted).
VARIABLES = {"sharpness": ["sharpness"], "fisher_trace": ["fisher_trace"],
             "coherence": ["grad_cov_trace", "grad_norm_sq", "multitask_grad_cov_trace", "multitask_grad_norm_sq"],
             "conflict": ["conflict"]}


def validate_metrics_config(metrics: dict, train_size: int | None = None) -> None:
    """Refuse unknown keys, factors and options, and sizes the measurements cannot have."""
    from mtlcore.config import ConfigError, is_int

    unknown = [k for k in metrics if k not in DEFAULTS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(DEFAULTS), n=1) for k in unknown}
        raise ConfigError(f"unknown metrics key(s) {unknown}{' (did you mean ' + str([h[0] for h in hints.values() if h]) + '?)' if any(hints.values()) else ''}; "
                          f"valid keys: {list(DEFAULTS)}")
    bad = [f for f in metrics.get("factors", []) if f not in FACTORS]
    if bad:
        raise ConfigError(f"unknown factor(s) {bad} in metrics.factors; valid factors: {list(FACTORS)}")
    every, examples = metrics.get("every", 1), metrics.get("examples", 2048)
    if not is_int(every, 1):
        raise ConfigError(f"metrics.every={every!r} must be a positive integer (epochs between measurements)")
    if not is_int(examples, 2):
        raise ConfigError(f"metrics.examples={examples!r} must be an integer >= 2")
    budget = metrics.get("budget_seconds")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ConfigError(f"metrics.budget_seconds={budget!r} must be a positive number or null")
    for factor in FACTORS:
        options = metrics.get(factor, {})
        unknown = sorted(set(options) - _option_names(factor))
        if unknown:
            raise ConfigError(f"metrics.{factor}: unknown option(s) {unknown}; valid options: {sorted(_option_names(factor))}")
    if "coherence" in metrics.get("factors", []):
        population = min(examples, train_size or examples)
        large = resolve(metrics)["coherence"]["large_batch"]
        if large > population:
            raise ConfigError(f"metrics.coherence.large_batch={large} exceeds the {population} examples measured "
                              f"(metrics.examples={examples}, train_size={train_size}); set large_batch <= {population}")


def _option_names(factor: str) -> set[str]:
    import inspect

    function = {"sharpness": sharpness, "fisher_trace": fisher_trace, "coherence": gradient_coherence,
                "conflict": gradient_conflict}[factor]
    names = {p.name for p in inspect.signature(function).parameters.values() if p.kind == p.KEYWORD_ONLY}
    if factor == "sharpness":
        names |= {"steps", "step_size", "momentum", "halving_checkpoints", "min_update_ratio", "random_init"}
    # set by the trainer from the run config
    return names - {"generator", "device", "progress", "loss", "losses", "reduction", "single_input"}


def resolve(metrics: dict) -> dict:
    out = {**DEFAULTS, **metrics}
    for factor in FACTORS:
        out[factor] = {**DEFAULTS[factor], **metrics.get(factor, {})}
    return out


class FactorSchedule:
    """Measures the configured factors at the scheduled epochs of one run."""

    def __init__(self, metrics: dict, seed: int, batch_size: int, loss_scale: str):
        self.config = resolve(metrics)
        self.seed, self.batch_size, self.loss_scale = seed, batch_size, loss_scale
        self.spent = 0.0

    @property
    def factors(self) -> list[str]:
        return list(self.config["factors"])

    def due(self, epoch: int) -> bool:
        if not self.factors or epoch % self.config["every"]:
            return False
        budget = self.config["budget_seconds"]
        if budget is not None and self.spent >= budget:
            log.info("metrics budget of %.0f s spent: epoch %d not measured", budget, epoch)
            return False
        return True

    def measure(self, model, setting, tasks: list[str], epoch: int,
                update_fn: Callable[..., torch.Tensor] | None) -> dict[str, np.ndarray]:
        """Variable -> values (one per task, or a scalar for the multi-task ones)."""
        from mtlcore._seeding import torch_generator

        start = time.perf_counter()
        n = self.config["examples"]
        data = {t: (setting.tasks[t].train.x[:n], setting.tasks[t].train.y[:n]) for t in tasks}
        kinds = {t: setting.tasks[t].loss for t in tasks}
        out: dict[str, np.ndarray] = {}
        with torch.random.fork_rng(devices=[]):
            def generator(name: str) -> torch.Generator:
                return torch_generator(self.seed, "metrics", name, epoch)

            if "sharpness" in self.factors:
                out["sharpness"] = np.array([sharpness(model, t, *data[t], loss=kinds[t], generator=generator(f"sharpness-{t}"),
                                                       **self.config["sharpness"]) for t in tasks])
            if "fisher_trace" in self.factors:
                out["fisher_trace"] = np.array([fisher_trace(model, t, *data[t], loss=kinds[t], generator=generator(f"fisher-{t}"),
                                                             **self.config["fisher_trace"]) for t in tasks])
            if "coherence" in self.factors:
                options = self.config["coherence"]
                per_task = [gradient_coherence(model, t, *data[t], loss=kinds[t], generator=generator(f"coherence-{t}"), **options)
                            for t in tasks]
                out["grad_cov_trace"] = np.array([c.trace_covariance for c in per_task])
                out["grad_norm_sq"] = np.array([c.grad_norm_sq for c in per_task])
                if len(tasks) > 1:
                    joint = multitask_gradient_coherence(model, data, tasks, losses=kinds, reduction=self.loss_scale,
                                                         generator=generator("coherence-mtl"), **options)
                    out["multitask_grad_cov_trace"] = np.array(joint.trace_covariance)
                    out["multitask_grad_norm_sq"] = np.array(joint.grad_norm_sq)
            if "conflict" in self.factors and len(tasks) > 1:  # Eq. 6 needs a partner; NaN for STL
                options = {"batch_size": self.batch_size, **self.config["conflict"]}
                cosines = gradient_conflict(model, data, update_fn, losses=kinds, reduction=self.loss_scale,
                                            generator=generator("conflict"), **options)
                out["conflict"] = np.array([cosines[t] for t in tasks])
        self.spent += time.perf_counter() - start
        return out


def applied_update(aggregator, loss_scale: str, num_tasks: int) -> Callable[..., torch.Tensor]:
    """The update rule a run applies to its shared parameters, as a function of J (for Eq. 6).

    Stateful aggregators are measured on a copy so that measuring leaves their state untouched;
    loss-level methods apply their current task weights.
    """
    if aggregator is None:
        scale = 1.0 if loss_scale == "sum" else float(num_tasks)
        return lambda jacobian: jacobian.sum(0) / scale
    frozen = copy.deepcopy(aggregator)
    if aggregator.kind == "loss" or aggregator.jacobian_of == "representation":
        weights = aggregator.weights.clone()
        return lambda jacobian: weights.to(jacobian) @ jacobian
    if not aggregator.needs_losses:
        return lambda jacobian: frozen(jacobian)

    def update(jacobian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:  # DB-MTL, loss-normalised MGDA
        return frozen(jacobian, losses)

    update.takes_losses = True  # gradient_conflict passes each batch's task losses
    return update
