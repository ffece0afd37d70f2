"""Random Loss Weighting (Lin et al. 2022): w = softmax(z), z ~ N(0, I), redrawn every step."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator


class RLW(LossAggregator):
    name = "rlw"
    randomised = True
    draws_on_host = True

    def _combine(self, losses, last_shared):
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        logits = torch.randn(len(losses), generator=self.generator, device=device, dtype=torch.float64)
        return self._weighted_sum(losses, torch.softmax(logits, dim=0))
