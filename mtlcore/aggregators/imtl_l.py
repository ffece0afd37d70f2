"""IMTL-L (Liu et al. 2021): Σ e^{s_i} L_i − s_i with learnable s (init 0), trained with the model."""
from __future__ import annotations

import torch

from mtlcore.aggregators.uncertainty import LearnedLogScale


class IMTLL(LearnedLogScale):
    name = "imtl_l"

    def _combine(self, losses, last_shared):
        s = self.log_scales.to(losses)
        return (torch.exp(s) * losses - s).sum(), torch.exp(s)
