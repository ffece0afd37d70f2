"""Dynamic Weight Average (Liu et al. 2019): weights from the last two epochs' loss ratios."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_finite, check_number, require


class DWA(LossAggregator):
    """λ = K softmax(w/T), w_k = L̄_k(t−1)/L̄_k(t−2) (epoch means from `end_epoch`); λ = 1 until
    two epochs have ended. combine(losses) = Σ λ_k L_k."""

    name = "dwa"
    defaults = {"temperature": 2.0}
    state_attributes = ("history",)

    def _check_options(self, options):
        check_number(self.name, options, "temperature", 1e-12)

    def _reset_state(self, num_tasks, device):
        self.history = torch.empty(0, num_tasks, dtype=torch.float64)  # last two epochs' mean losses

    def end_epoch(self, epoch_mean_losses):
        require(self.num_tasks is not None, "dwa: call reset(num_tasks) or combine() before end_epoch()")
        means = epoch_mean_losses.detach().to("cpu", torch.float64).reshape(1, -1)
        require(
            means.shape[1] == self.num_tasks,
            f"dwa: expected {self.num_tasks} epoch mean losses, got {means.shape[1]}",
        )
        check_finite(self.name, means, "the epoch mean losses")
        self.history = torch.cat([self.history, means])[-2:]

    def current_weights(self) -> torch.Tensor:
        if len(self.history) < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64)
        ratios = self.history[-1] / self.history[-2]
        return self.num_tasks * torch.softmax(ratios / self.options["temperature"], dim=0)

    def _combine(self, losses, last_shared):
        return self._weighted_sum(losses, self.current_weights())
