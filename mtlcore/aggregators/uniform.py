"""Uniform (UMTG) and fixed task weights: d = Σ w_k g_k with w known in advance."""
from __future__ import annotations

import math

import numpy as np
import torch

from mtlcore.aggregators.base import WeightedAggregator, check_finite, require


class ConstantWeights(WeightedAggregator):
    """Weights known in advance: computed once per (K, device, dtype), then each call is one GEMV and a
    finiteness check of d (a NaN/inf in J reaches d, since 0·inf is NaN too)."""

    needs_gramian = False

    def _reset_state(self, num_tasks, device):
        self._cached = None

    def __call__(self, J, losses=None):
        self._check_inputs(J, losses)
        key = (J.shape[0], J.device, J.dtype)
        if getattr(self, "_cached", None) is None or self._cached[0] != key:
            weights = self._gramian_weights(J, losses)
            # Separate copies: an in-place edit of agg.weights (which callers only read) cannot reach the update.
            self._cached = (key, torch.from_numpy(weights.copy()).to(J.device, J.dtype), torch.from_numpy(weights))
        _, w, self.weights = self._cached
        d = J.T @ w
        check_finite(self.name, d, "the task gradients J")
        return d

    def _aggregate(self, J, losses):  # weights_from() and subclasses that bypass __call__
        weights = self._gramian_weights(J, losses)
        d = J.T @ torch.from_numpy(weights).to(J.device, J.dtype)
        check_finite(self.name, d, "the task gradients J")
        return d, weights


class Uniform(ConstantWeights):
    """d = Σ g_k ("sum") or (1/K) Σ g_k ("mean")."""

    name = "uniform"
    defaults = {"reduction": "sum"}  # REFERENCE Eq. 2: C = 1 unless noted, as RunConfig.loss_scale

    def _check_options(self, options):
        require(
            options["reduction"] in ("sum", "mean"),
            f"uniform: reduction must be 'sum' or 'mean', got {options['reduction']!r}",
        )

    def _weights(self, G, losses):
        num_tasks = self.num_tasks
        return np.full(num_tasks, 1.0 if self.options["reduction"] == "sum" else 1.0 / num_tasks)


class Fixed(ConstantWeights):
    """d = Σ w_k g_k for given constant weights (e.g. an SMTO's EMA-smoothed mean weights)."""

    name = "fixed"
    defaults = {"weights": None}

    def _check_options(self, options):
        message = f"fixed: weights must be a non-empty list of finite numbers, got {options['weights']!r}"
        try:
            weights = [float(w) for w in options["weights"]]
        except (TypeError, ValueError):
            raise ValueError(message) from None
        require(len(weights) > 0 and all(math.isfinite(w) for w in weights), message)
        options["weights"] = weights

    def _weights(self, G, losses):
        weights = np.asarray(self.options["weights"], dtype=np.float64)
        require(
            len(weights) == self.num_tasks,
            f"fixed: {len(weights)} weights were given for {self.num_tasks} tasks",
        )
        return weights
