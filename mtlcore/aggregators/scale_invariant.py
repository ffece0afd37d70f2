"""Scale-invariant loss: Σ log(L_i + ε); the effective weight of ∇L_i is 1/(L_i + ε)."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_number


class ScaleInvariant(LossAggregator):
    name = "scale_invariant"
    defaults = {"eps": 1e-8}  # keeps log finite at L = 0 (FAMO's ε)

    def _check_options(self, options):
        check_number(self.name, options, "eps", 0.0)

    def _combine(self, losses, last_shared):
        shifted = losses + self.options["eps"]
        return torch.log(shifted).sum(), 1.0 / shifted.detach()
