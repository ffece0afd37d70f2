"""Aligned-MTL (Senushkin et al. 2023): the task gradients made orthogonal with equal norms."""
from __future__ import annotations

import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, PermutationInvariant, ResumesBitForBit,
    StrictOptions, Weighted, make, random_jacobian,
)


class TestAlignedMTL(ExpectedStructure, Weighted, PermutationInvariant, Homogeneous, Deterministic, ResumesBitForBit,
                     StrictOptions, DivergenceDetection):
    name = "aligned_mtl"
    configurations = [{}, {"scale_mode": "median"}, {"scale_mode": "rmse"}]
    bad_options = [({"scale_mode": "max"}, "aligned_mtl: scale_mode must be one of ['median', 'min', 'rmse']")]


def test_balances_orthogonal_gradients_to_the_smallest_norm():
    J = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(make("aligned_mtl", 3)(J), torch.ones(3))


def test_scale_modes_set_the_common_norm():
    """Orthogonal gradients with squared norms 1, 4, 9, 16: each is rescaled to √λ with λ the smallest eigenvalue of
    G (min), the median of its eigenvalues (average of the middle two) or their mean (rmse)."""
    J = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    for scale_mode, squared in (("min", 1.0), ("median", 6.5), ("rmse", 7.5)):
        d = make("aligned_mtl", 4, scale_mode=scale_mode)(J)
        torch.testing.assert_close(d, torch.full((4,), squared**0.5, dtype=torch.float64))


def test_drops_dependent_directions():
    """Rank 2 of 3: the weights come from the two kept eigenpairs only, and d stays finite."""
    J = random_jacobian(3, 10, 2, seed=4)
    agg = make("aligned_mtl", 3)
    d = agg(J)
    G = J.double() @ J.double().T
    eigenvalues, eigenvectors = torch.linalg.eigh(G / G.trace())
    kept = eigenvalues > 1e-10 * eigenvalues.max()
    V, L = eigenvectors[:, kept], eigenvalues[kept]
    expected = (L.min().sqrt() * (V / L.sqrt()) @ V.T).sum(dim=1)
    torch.testing.assert_close(agg.weights, expected, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(d).all()
