"""IMTL-G (Liu et al. 2021): d has the same projection on every unit task gradient."""
from __future__ import annotations

import math

import numpy as np

from mtlcore.aggregators._qp import RANK_RTOL
from mtlcore.aggregators.base import WeightedAggregator, normalize_gramian, uniform_weights


def imtl_g_weights(G: np.ndarray) -> np.ndarray:
    """w ∝ G⁺ √diag(G), normalised to Σw = 1 (closed form of the paper's condition).

    The pseudo-inverse drops eigenvalues below RANK_RTOL·max: for rank-deficient G the equal
    projections are met in the least-squares sense. w = 1/K when Σw = 0 (e.g. J = 0).
    """
    G, scale = normalize_gramian(G)
    if not scale > 0:
        return uniform_weights(len(G))
    # G⁺ s from one symmetric eigendecomposition (pinv(hermitian=True) without its overhead); eigh reads one
    # triangle and sorts the eigenvalues ascending, so the largest is the last. Dropped eigenvalues become inf,
    # so their inverse is 0 without a division warning.
    eigenvalues, eigenvectors = np.linalg.eigh(G)
    kept = np.where(eigenvalues > RANK_RTOL * eigenvalues[-1], eigenvalues, np.inf)
    v = eigenvectors @ ((eigenvectors.T @ np.sqrt(np.maximum(np.diagonal(G), 0.0))) / kept)
    total = float(v.sum())
    return v / total if total > 0 and math.isfinite(total) else uniform_weights(len(G))


class IMTLG(WeightedAggregator):
    name = "imtl_g"

    def _weights(self, G, losses):
        return imtl_g_weights(G)
