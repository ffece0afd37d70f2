"""GradDrop (Chen et al. 2020): keep, per coordinate, only gradients of one sign, drawn at random."""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import GradientAggregator, check_number


class GradDrop(GradientAggregator):
    """P = ½(1 + Σg/Σ|g|) per coordinate; with U ~ U(0,1), keep positive gᵢ where P > U and
    negative ones where P < U; d = Σ (leak + (1 − leak)·mask) ⊙ gᵢ.

    Applied to the shared-parameter Jacobian (LibMTL applies it to representation gradients).
    No weights w with d = Jᵀw exist: `weights` is NaN.
    """

    name = "graddrop"
    defaults = {"leak": 0.0}
    randomised = True

    def _check_options(self, options):
        check_number(self.name, options, "leak", 0.0, 1.0)

    def _aggregate(self, J, losses):
        total, magnitude = J.sum(dim=0), J.abs().sum(dim=0)
        purity = 0.5 * (1 + torch.where(magnitude > 0, total / magnitude.clamp_min(torch.finfo(J.dtype).tiny), 0.0))
        device = self.generator.device if self.generator is not None else J.device
        uniform = torch.rand(J.shape[1], generator=self.generator, device=device, dtype=J.dtype).to(J.device)
        keep = ((purity > uniform) & (J > 0)) | ((purity < uniform) & (J < 0))
        leak = self.options["leak"]
        d = ((leak + (1 - leak) * keep.to(J.dtype)) * J).sum(dim=0)
        return d, torch.full((J.shape[0],), math.nan)
