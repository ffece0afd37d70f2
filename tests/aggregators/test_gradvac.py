"""Gradient Vaccine (Wang et al. 2021): raise each pair's cosine to an EMA target."""
from __future__ import annotations

import numpy as np
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, LinearUnderScaling, ResumesBitForBit,
    StrictOptions, Weighted, make, random_jacobian,
)


class TestGradVac(ExpectedStructure, Weighted, LinearUnderScaling, Homogeneous, Deterministic, ResumesBitForBit,
                  StrictOptions, DivergenceDetection):
    """Not permutation invariant: the order of the adjustments is drawn, as PCGrad's."""

    name = "gradvac"
    configurations = [{}, {"beta": 0.01}]
    bad_options = [({"beta": 2.0}, "gradvac: option beta must be a number >= 0.0 <= 1.0")]


def test_with_zero_targets_the_first_step_projects_like_pcgrad():
    """With targets 0 the first GradVac step removes negative cosines exactly as PCGrad."""
    J = random_jacobian(2, 10, None, seed=5)
    torch.testing.assert_close(make("gradvac")(J), make("pcgrad")(J), rtol=1e-4, atol=1e-5)


def test_targets_are_the_ema_of_the_cosines():
    """Two tasks: each pair is visited once per step, so ρ̂_ij ← (1 − β)ρ̂_ij + β·cos(g̃_i, g_j) with g̃_i the
    gradient before its adjustment for j, here g_i itself."""
    agg = make("gradvac", beta=0.25)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for step in range(3):
        J = random_jacobian(2, 10, None, seed=20 + step).double()
        agg(J)
        cosine = (J[0] @ J[1]) / (J[0].norm() * J[1].norm())
        expected = 0.75 * expected + 0.25 * cosine * (1 - torch.eye(2, dtype=torch.float64))
        torch.testing.assert_close(agg.targets, expected, rtol=1e-7, atol=1e-12)


def test_is_exact_for_gradients_of_very_different_norms():
    """Two conflicting gradients with norms 1e-3 and 1e3, targets 0: the textbook update g̃_i = g_i −
    (g_i·g_j/‖g_j‖²) g_j, so w_j = 1 − g_i·g_j/‖g_i‖². The small gradient's correction, −g_0·g_1/‖g_1‖² ≈ 4e-7,
    is exact to 1e-6; LibMTL's additive 1e-8 guard made it 1% off."""
    J = torch.tensor([[1e-3, 2e-4, 0.0], [-5e2, 1e3, 3e2]], dtype=torch.float64)
    agg = make("gradvac")
    agg(J)
    g = J.numpy()
    corrections = agg.weights.numpy() - 1.0
    np.testing.assert_allclose(corrections, [-(g[0] @ g[1]) / (g[0] @ g[0]), -(g[0] @ g[1]) / (g[1] @ g[1])], rtol=1e-6)
