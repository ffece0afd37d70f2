"""Uncertainty weighting (Kendall et al. 2018): Σ ½e^{−s_i} L_i + ½ s_i with learnable s = log σ²."""
from __future__ import annotations

import torch
from torch import nn

from mtlcore.aggregators.base import LossAggregator, check_number


class LearnedLogScale(LossAggregator):
    """A loss weighting with one learnable log-scale s_i per task (trained with the model)."""

    defaults = {"init": 0.0}
    state_attributes = ("log_scales",)

    def _check_options(self, options):
        check_number(self.name, options, "init")

    def _reset_state(self, num_tasks, device):
        self.log_scales = nn.Parameter(torch.full((num_tasks,), float(self.options["init"]), device=device))

    def parameters(self):
        if self.num_tasks is None:
            raise RuntimeError(f"{self.name}: call reset(num_tasks) before parameters() to create them")
        return [self.log_scales]


class Uncertainty(LearnedLogScale):
    """s_i = log σ_i² (init 0); the effective weight of ∇L_i is ½e^{−s_i}.

    The ½ applies to every task, as in LibMTL's and Nash-MTL's code. Kendall et al.'s paper writes
    e^{−s}L + ½s for classification losses: the same resting weight 1/(2L), reached along another path.
    """

    name = "uncertainty"

    def _combine(self, losses, last_shared):
        s = self.log_scales.to(losses)
        return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum(), 0.5 * torch.exp(-s)
