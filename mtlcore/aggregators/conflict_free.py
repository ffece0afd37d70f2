"""ConFIG (Liu et al. 2024): the conflict-free update, at equal angle to every task gradient."""
from __future__ import annotations

import torch

from mtlcore.aggregators._qp import RANK_RTOL, symmetric_eigen, unit_gramian
from mtlcore.aggregators.base import WeightedAggregator


def config_weights(G: torch.Tensor) -> torch.Tensor:
    """Weights of ConFIG's d (Eq. 2): with U the unit gradients ĝ_k = g_k/‖g_k‖ (a zero g_k: a zero row),
    x = U⁺1 (every ĝ_k·x = 1 where U has full row rank), and d = (Σ_k g_kᵀx̂) x̂, x̂ = x/‖x‖.

    All from G: U⁺ = Uᵀ(UUᵀ)⁺ and UUᵀ = C, the unit Gramian, so x = Jᵀu with u = D⁻¹C⁺1 (D = diag‖g_k‖),
    ‖x‖² = uᵀGu and Σ_k g_kᵀx = 1ᵀGu: d = Jᵀw with w = u·(1ᵀGu)/(uᵀGu). C⁺ drops C's eigenvalues below
    RANK_RTOL × the largest (as a pseudo-inverse of U drops its small singular values)."""
    C, norms = unit_gramian(G)
    eigenvalues, eigenvectors = symmetric_eigen(C)
    kept = eigenvalues > RANK_RTOL * eigenvalues[-1].clamp(min=0.0)
    if not kept.any():  # every gradient is zero
        return torch.zeros(len(G), dtype=G.dtype)
    V = eigenvectors[:, kept]
    v = V @ ((V.T @ torch.ones(len(G), dtype=G.dtype)) / eigenvalues[kept])
    u = torch.where(norms > 0, v / torch.where(norms > 0, norms, 1.0), 0.0)
    squared = u @ G @ u
    return u * ((G @ u).sum() / squared) if squared > 0 else torch.zeros_like(u)


class ConFIG(WeightedAggregator):
    """d has the same cosine with every task gradient (full row rank J) and length Σ_k g_kᵀd̂, the sum of the
    gradients' projections on its direction. For linearly dependent gradients U⁺1 only fits ĝ_k·x = 1 in least
    squares, and d may conflict with some g_k (the paper assumes K ≤ P independent gradients). Equal
    preferences (the paper's default); TorchJD's optional `pref_vector` is not offered."""

    name = "config"

    def _weights(self, G, losses):
        return config_weights(G)
