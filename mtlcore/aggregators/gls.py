"""Geometric Loss Strategy (Chennupati et al. 2019): the geometric mean of the task losses, (Π L_k)^{1/K}."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator


class GLS(LossAggregator):
    """combine = exp(mean log L_k), the geometric mean (Π L_k)^{1/K} computed in log space, so that K small losses
    do not underflow their product; the effective weight of ∇L_k is ∂/∂L_k = GM / (K L_k). A zero loss makes that
    weight infinite (the geometric mean has no finite slope there) and the run diverges, as the product form does.
    LibMTL returns L_k / (K Π L) as its weights; these are the true ones."""

    name = "gls"

    def _combine(self, losses, last_shared):
        total = torch.log(losses).mean().exp()
        return total, (total.detach() / (len(losses) * losses.detach())).double()
