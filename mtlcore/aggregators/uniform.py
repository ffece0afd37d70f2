"""Uniform (UMTG) and fixed task weights: d = Σ w_k g_k with w known in advance."""
from __future__ import annotations

import math

import numpy as np

from mtlcore.aggregators.base import WeightedAggregator, require


class Uniform(WeightedAggregator):
    """d = Σ g_k ("sum") or (1/K) Σ g_k ("mean")."""

    name = "uniform"
    needs_gramian = False
    defaults = {"reduction": "sum"}  # REFERENCE Eq. 2: C = 1 unless noted, as RunConfig.loss_scale

    def _check_options(self, options):
        require(
            options["reduction"] in ("sum", "mean"),
            f"uniform: reduction must be 'sum' or 'mean', got {options['reduction']!r}",
        )

    def _weights(self, G, losses):
        num_tasks = self.num_tasks
        return np.full(num_tasks, 1.0 if self.options["reduction"] == "sum" else 1.0 / num_tasks)


class Fixed(WeightedAggregator):
    """d = Σ w_k g_k for given constant weights (e.g. an SMTO's EMA-smoothed mean weights)."""

    name = "fixed"
    needs_gramian = False
    defaults = {"weights": None}

    def _check_options(self, options):
        message = f"fixed: weights must be a non-empty list of finite numbers, got {options['weights']!r}"
        try:
            if any(isinstance(w, (str, bool)) for w in options["weights"]):
                raise TypeError
            weights = [float(w) for w in options["weights"]]
        except (TypeError, ValueError):
            raise ValueError(message) from None
        require(len(weights) > 0 and all(math.isfinite(w) for w in weights), message)
        options["weights"] = weights

    def reset(self, num_tasks, device=None):
        # Checked here, so that a run config with the wrong count is refused before anything trains,
        # and before reset changes any state.
        require(
            len(self.options["weights"]) == num_tasks,
            f"fixed: {len(self.options['weights'])} weights were given for {num_tasks} tasks; give one per task",
        )
        super().reset(num_tasks, device)

    def _weights(self, G, losses):
        return np.asarray(self.options["weights"], dtype=np.float64)
