"""Uniform (UMTG) and fixed task weights: d = Σ w_k g_k with w known in advance."""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import WeightedAggregator, check_finite, require


class ConstantWeighting(WeightedAggregator):
    """Weights that need no Gramian: d = Jᵀw directly. NaN/inf in J reach d (0·inf is NaN too), so d is checked
    (P entries) instead of J (K×P). The weights are kept in J's device and dtype until `reset`."""

    _constant: tuple | None = None  # (the float64 weights, the same in J's device and dtype)

    def _reset_state(self, num_tasks, device):
        self._constant = None

    def _aggregate(self, J, losses):
        if self._constant is None or self._constant[1].dtype is not J.dtype or self._constant[1].device != J.device:
            weights = self._weights(None, None)
            self._constant = (weights, weights.to(J))
        weights, w = self._constant
        d = torch.mv(J.T, w)
        check_finite(self.name, d, "the task gradients J")
        return d, weights


class Uniform(ConstantWeighting):
    """d = Σ g_k ("sum") or (1/K) Σ g_k ("mean")."""

    name = "uniform"
    defaults = {"reduction": "sum"}  # paper A, Eq. 2: C = 1 unless noted, as RunConfig.loss_scale

    def _check_options(self, options):
        require(
            options["reduction"] in ("sum", "mean"),
            f"uniform: reduction must be 'sum' or 'mean', got {options['reduction']!r}",
        )

    def _weights(self, G, losses):
        num_tasks = self.num_tasks
        return torch.full((num_tasks,), 1.0 if self.options["reduction"] == "sum" else 1.0 / num_tasks,
                          dtype=torch.float64)


class Fixed(ConstantWeighting):
    """d = Σ w_k g_k for given constant weights (e.g. an SMTO's EMA-smoothed mean weights). `source`: where the
    weights came from (the run id of the SMTO run they were derived from, say), recorded with the run; "" for none."""

    name = "fixed"
    defaults = {"weights": None, "source": ""}

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
        require(isinstance(options["source"], str),
                f"fixed: source must be a string (e.g. the run id the weights came from), got {options['source']!r}")

    def reset(self, num_tasks, device=None):
        # Checked here, so that a run config with the wrong count is refused before anything trains,
        # and before reset changes any state.
        require(
            len(self.options["weights"]) == num_tasks,
            f"fixed: {len(self.options['weights'])} weights were given for {num_tasks} tasks; give one per task",
        )
        super().reset(num_tasks, device)

    def _weights(self, G, losses):
        return torch.tensor(self.options["weights"], dtype=torch.float64)
