"""IMTL-G (Liu et al. 2021): d has the same projection on every unit task gradient."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlcore.aggregators._qp import RANK_RTOL, symmetric_eigen, unit_gramian
from mtlcore.aggregators.base import WeightedAggregator, uniform_weights


def imtl_g_weights(G: Tensor) -> Tensor:
    """w ∝ G⁺ √diag(G), normalised to Σw = 1 (closed form of the paper's condition).

    Computed as D^-½ C⁺ 1 with C = D^-½ G D^-½ the Gramian of the unit gradients (D = diag G), so the rank
    is judged on directions, not on norms: a small but independent gradient is a task, not rank
    deficiency. C⁺ drops eigenvalues below RANK_RTOL·max, so for dependent gradients the equal
    projections are met in the least-squares sense. Zero gradients get weight 0; w = 1/K when Σw = 0.
    """
    C, norms = unit_gramian(G)  # scale-free: no trace normalisation needed
    live = norms > 0
    if not live.any():
        return uniform_weights(len(G))
    # C⁺1 from one symmetric eigendecomposition; it sorts the eigenvalues ascending, so the largest is the last.
    # Dropped ones (zero gradients' among them) become inf: their inverse is 0.
    eigenvalues, eigenvectors = symmetric_eigen(C)
    kept = torch.where(eigenvalues > RANK_RTOL * eigenvalues[-1], eigenvalues, math.inf)
    unit_weights = eigenvectors @ (eigenvectors.sum(dim=0) / kept)
    v = torch.where(live, unit_weights / torch.where(live, norms, 1.0), 0.0)  # a zero gradient gets weight 0
    total = float(v.sum())
    return v / total if total > 0 and math.isfinite(total) else uniform_weights(len(G))


class IMTLG(WeightedAggregator):
    name = "imtl_g"

    def _weights(self, G, losses):
        return imtl_g_weights(G)
