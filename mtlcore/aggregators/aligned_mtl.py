"""Aligned-MTL (Senushkin et al. 2023): make the task gradients orthogonal with equal norms."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators._qp import RANK_RTOL, symmetric_eigen
from mtlcore.aggregators.base import WeightedAggregator, normalize_gramian, require

# applied to the kept eigenvalues; quantile 0.5 averages the middle two of an even count, as a median does
SCALES = {"min": torch.min, "median": lambda x: torch.quantile(x, 0.5), "rmse": torch.mean}


def aligned_mtl_weights(G: Tensor, scale_mode: str) -> Tensor:
    """α = B·1 with B = √λ_scale · V Λ^{-½} Vᵀ over the non-zero eigenpairs of G = VΛVᵀ.

    The authors' code: eigenvalues below a relative tolerance are dropped (rank truncation);
    λ_scale is the smallest kept eigenvalue ("min", the default), their median or their mean
    ("rmse"). B does not depend on the scale of G. All-zero J gives zero weights (d = 0).
    """
    G, scale = normalize_gramian(G)
    if scale <= 0:
        return torch.zeros(len(G), dtype=G.dtype)
    eigenvalues, eigenvectors = symmetric_eigen((G + G.T) / 2)
    kept = eigenvalues > RANK_RTOL * eigenvalues.max()
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    B = SCALES[scale_mode](eigenvalues).sqrt() * (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T
    return B.sum(dim=1)


class AlignedMTL(WeightedAggregator):
    name = "aligned_mtl"
    defaults = {"scale_mode": "min"}

    def _check_options(self, options):
        require(
            options["scale_mode"] in SCALES,
            f"aligned_mtl: scale_mode must be one of {sorted(SCALES)}, got {options['scale_mode']!r}",
        )

    def _weights(self, G, losses):
        return aligned_mtl_weights(G, self.options["scale_mode"])
