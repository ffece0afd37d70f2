"""GradDrop (Chen et al. 2020): keep, per coordinate, only gradients of one sign, drawn at random."""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import LOW_PRECISION, GradientAggregator, check_finite, check_number

GRADDROP_BLOCK = 1 << 18  # entries of J per column block (1 MB of float32)


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
        check_finite(self.name, J, "the task gradients J")  # an inf can vanish from d: its P is NaN, nothing kept
        device = self.generator.device if self.generator is not None else J.device
        uniform = torch.rand(J.shape[1], generator=self.generator, device=device, dtype=J.dtype).to(J.device)
        d = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
        leak = self.options["leak"]
        sums = torch.float32 if J.dtype in LOW_PRECISION else J.dtype  # float16's own sums overflow at 65504
        # Per coordinate, P and d need only the sums of the positive and of the negative entries: d = leak·Σg +
        # (1 − leak)·(the kept sign's sum). Two reductions instead of a K×P mask, in column blocks so that the
        # temporaries stay cache-sized on the CPU.
        columns = max(1, GRADDROP_BLOCK // J.shape[0]) if J.device.type == "cpu" else max(1, J.shape[1])
        for start in range(0, J.shape[1], columns):
            block = J[:, start : start + columns]
            positive = block.clamp(min=0).sum(dim=0, dtype=sums)
            negative = block.clamp(max=0).sum(dim=0, dtype=sums)
            total, magnitude = positive + negative, positive - negative
            purity = 0.5 * (1 + torch.where(magnitude > 0, total / magnitude.clamp_min(torch.finfo(sums).tiny), 0.0))
            u = uniform[start : start + columns]
            kept = torch.where(purity > u, positive, 0.0) + torch.where(purity < u, negative, 0.0)
            # one rounding to J's dtype
            d[start : start + columns] = kept if leak == 0 else leak * total + (1 - leak) * kept
        return d, torch.full((J.shape[0],), math.nan)
