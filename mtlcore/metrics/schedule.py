"""Trajectory factors measured during training: which, when, on what data, within what budget.

A run's `metrics:` config, e.g. ``{"factors": ["sharpness", "fisher_trace"], "every": 1}``. Factors are
measured at epoch 0 and every `every` epochs on the first `examples` training examples of each task,
inside `torch.random.fork_rng`, so that measuring never changes the training trajectory.
"""
from __future__ import annotations

import difflib
import logging
import time

import numpy as np
import torch

from mtlcore._seeding import torch_generator
from mtlcore._validation import is_int
from mtlcore.metrics.coherence import gradient_coherence, multitask_gradient_coherence
from mtlcore.metrics.conflict import UpdateFn, gradient_conflict
from mtlcore.metrics.fisher import fisher_trace
from mtlcore.metrics.sharpness import sharpness

log = logging.getLogger(__name__)


def mean_gradient(jacobian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """ḡ, the mean of the task gradients (the rows of J): the direction of paper B's conflict measure."""
    return jacobian.mean(dim=0)


FACTORS = ("sharpness", "fisher_trace", "coherence", "conflict", "conflict_to_mean")
DEFAULTS = {
    "factors": [],
    "every": 1,  # epochs between measurements; epoch 0 is always measured
    "examples": 2048,  # S_k: the first `examples` training examples of each task (fixed; paper A, Appendix B)
    "budget_seconds": None,  # stop measuring once the run has spent this long on measurements
    "sharpness": {"rho": 1e-3, "batch_size": 128},
    "fisher_trace": {"empirical": False},
    "coherence": {"small_batch": 16, "large_batch": 1024},
    "conflict": {"num_batches": 200},
    "conflict_to_mean": {"num_batches": 200},  # cos(g_k, ḡ); paper B's measure is its task mean
}
# Variables each factor fills in the run dataset (per epoch and task unless noted).
VARIABLES = {"sharpness": ["sharpness"], "fisher_trace": ["fisher_trace"],
             "coherence": ["grad_cov_trace", "grad_norm_sq", "multitask_grad_cov_trace", "multitask_grad_norm_sq"],
             "conflict": ["conflict"], "conflict_to_mean": ["conflict_to_mean"]}


def validate_metrics_config(metrics: dict, train_size: int | None = None) -> None:
    """Refuse unknown keys, factors and options, and sizes the measurements cannot have (ValueError)."""
    unknown = [k for k in metrics if k not in DEFAULTS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(DEFAULTS), n=1) for k in unknown}
        hint = f" (did you mean {[h[0] for h in hints.values() if h]}?)" if any(hints.values()) else ""
        raise ValueError(f"unknown metrics key(s) {unknown}{hint}; valid keys: {list(DEFAULTS)}")
    bad = [f for f in metrics.get("factors", []) if f not in FACTORS]
    if bad:
        raise ValueError(f"unknown factor(s) {bad} in metrics.factors; valid factors: {list(FACTORS)}")
    every, examples = metrics.get("every", 1), metrics.get("examples", 2048)
    if not is_int(every, 1):
        raise ValueError(f"metrics.every={every!r} must be a positive integer (epochs between measurements)")
    if not is_int(examples, 2):
        raise ValueError(f"metrics.examples={examples!r} must be an integer >= 2")
    budget = metrics.get("budget_seconds")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"metrics.budget_seconds={budget!r} must be a positive number or null")
    for factor in FACTORS:
        options = metrics.get(factor, {})
        unknown = sorted(set(options) - _option_names(factor))
        if unknown:
            raise ValueError(f"metrics.{factor}: unknown option(s) {unknown}; valid options: {sorted(_option_names(factor))}")
    if "coherence" in metrics.get("factors", []):
        population = min(examples, train_size or examples)
        large = resolve(metrics)["coherence"]["large_batch"]
        if large > population:
            raise ValueError(f"metrics.coherence.large_batch={large} exceeds the {population} examples measured "
                             f"(metrics.examples={examples}, train_size={train_size}); set large_batch <= {population}")


def _option_names(factor: str) -> set[str]:
    import inspect

    function = {"sharpness": sharpness, "fisher_trace": fisher_trace, "coherence": gradient_coherence,
                "conflict": gradient_conflict, "conflict_to_mean": gradient_conflict}[factor]
    names = {p.name for p in inspect.signature(function).parameters.values() if p.kind == p.KEYWORD_ONLY}
    if factor == "sharpness":
        names |= {"steps", "step_size", "momentum", "halving_checkpoints", "min_update_ratio", "random_init"}
    if factor == "coherence":  # passed on to the per-example gradients (a large model needs small chunks)
        names |= {"chunk_size", "method"}
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

    def measure(self, model, data, tasks: dict, epoch: int, update: UpdateFn | None) -> dict[str, np.ndarray]:
        """Variable -> values (one per task, or a scalar for the multi-task ones).

        data: the run's `SettingData`; tasks: task name → its `Task` (loss and scores), in the run's order;
        update: the direction the run applies, for the conflict (Eq. 6).
        """
        start = time.perf_counter()
        n = self.config["examples"]
        names = list(tasks)
        examples = {t: data.examples["train"][t].first(n) for t in names}
        measured = {t: (e.inputs, e.targets) for t, e in examples.items()}
        losses = {t: task.loss for t, task in tasks.items()}
        single_input = data.joint is not None
        out: dict[str, np.ndarray] = {}
        with torch.random.fork_rng(devices=[]):
            def generator(name: str) -> torch.Generator:
                return torch_generator(self.seed, "metrics", name, epoch)

            if "sharpness" in self.factors:
                out["sharpness"] = np.array([sharpness(model, t, *measured[t], loss=losses[t],
                                                       generator=generator(f"sharpness-{t}"), **self.config["sharpness"])
                                             for t in names])
            if "fisher_trace" in self.factors:
                out["fisher_trace"] = np.array([fisher_trace(model, t, *measured[t], loss=losses[t],
                                                             generator=generator(f"fisher-{t}"),
                                                             **self.config["fisher_trace"]) for t in names])
            if "coherence" in self.factors:
                options = self.config["coherence"]
                per_task = [gradient_coherence(model, t, *measured[t], loss=losses[t],
                                               generator=generator(f"coherence-{t}"), **options) for t in names]
                out["grad_cov_trace"] = np.array([c.trace_covariance for c in per_task])
                out["grad_norm_sq"] = np.array([c.grad_norm_sq for c in per_task])
                if len(names) > 1:
                    joint = multitask_gradient_coherence(model, measured, names, losses=losses, reduction=self.loss_scale,
                                                         single_input=single_input, generator=generator("coherence-mtl"),
                                                         **options)
                    out["multitask_grad_cov_trace"] = np.array(joint.trace_covariance)
                    out["multitask_grad_norm_sq"] = np.array(joint.grad_norm_sq)
            if "conflict" in self.factors and len(names) > 1:  # Eq. 6 needs a partner; NaN for STL
                options = {"batch_size": self.batch_size, **self.config["conflict"]}
                cosines = gradient_conflict(model, measured, update, losses=losses, reduction=self.loss_scale,
                                            single_input=single_input, generator=generator("conflict"), **options)
                out["conflict"] = np.array([cosines[t] for t in names])
            if "conflict_to_mean" in self.factors and len(names) > 1:  # paper B: cos(g_k, ḡ) whatever the update
                options = {"batch_size": self.batch_size, **self.config["conflict_to_mean"]}
                cosines = gradient_conflict(model, measured, mean_gradient, losses=losses, single_input=single_input,
                                            generator=generator("conflict_to_mean"), **options)
                out["conflict_to_mean"] = np.array([cosines[t] for t in names])
        self.spent += time.perf_counter() - start
        return out
