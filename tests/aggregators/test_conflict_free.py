"""ConFIG (Liu et al. 2024): the conflict-free update at equal angle to every task gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    J_REFERENCE, CASES, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, NonConflicting,
    PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, is_full_row_rank, jacobians, random_jacobian,
)

from mtlcore.aggregators import get


class TestConFIG(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Homogeneous, Deterministic,
                 ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "config"
    full_rank_only = True  # for dependent gradients U⁺1 is a least-squares fit: some ĝ_k·x may be negative


def config_by_pseudo_inverse(J: np.ndarray) -> np.ndarray:
    """Eq. 2 written out on J: unit rows U, x = pinv(U)·1, d = (Σ_k g_kᵀx̂) x̂. Singular values of U below 1e-5 of
    the largest count as zero (float32 rounding of a rank-deficient J leaves ~1e-7 there; TorchJD's float32 pinv
    drops them alike)."""
    U = J / np.linalg.norm(J, axis=1, keepdims=True)
    x = np.linalg.pinv(U, rcond=1e-5) @ np.ones(len(J))
    unit = x / np.linalg.norm(x)
    return (J @ unit).sum() * unit


def test_by_hand_on_the_reference_jacobian():
    """g₁ = (−4, 1, 1), g₂ = (6, 1, 1): x = U⁺1 lies in their span with ĝ₁·x = ĝ₂·x = 1; by the symmetry of the
    last two coordinates x = (a, b, b) with −4a + 2b = √18 and 6a + 2b = √38, so a = (√38 − √18)/10."""
    a = (np.sqrt(38) - np.sqrt(18)) / 10
    b = (np.sqrt(18) + 4 * a) / 2
    unit = np.array([a, b, b]) / np.linalg.norm([a, b, b])
    expected = (J_REFERENCE.double().numpy() @ unit).sum() * unit
    np.testing.assert_allclose(get("config")(J_REFERENCE.double()).numpy(), expected, rtol=1e-12)


def test_equal_cosine_with_every_task_gradient():
    for case, J in zip(CASES, jacobians()):
        if not is_full_row_rank(J):
            continue
        J = J.double()
        d = get("config")(J)
        cosines = (J @ d) / (J.norm(dim=1) * d.norm())
        assert (cosines > 0).all(), case
        torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines), rtol=1e-9, atol=0, msg=str(case))
        torch.testing.assert_close(d.norm(), (J @ (d / d.norm())).sum(), rtol=1e-9, atol=0)


def test_against_the_pseudo_inverse_of_the_unit_gradients():
    """The weights from G against Eq. 2 computed on J itself, rank-deficient cases included."""
    for case, J in zip(CASES, jacobians()):
        J = J.double()
        np.testing.assert_allclose(get("config")(J).numpy(), config_by_pseudo_inverse(J.numpy()), rtol=1e-6,
                                   atol=1e-9 * J.norm().item(), err_msg=str(case))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for seed, (K, P) in enumerate([(2, 5), (3, 10), (5, 50), (10, 30)]):
        J = random_jacobian(K, P, None, seed=seed).double()
        torch.testing.assert_close(get("config")(J), tjd.ConFIG()(J), rtol=1e-9, atol=1e-12)


def test_zero_gradient_rows_are_left_out():
    """A zero g_k has no direction: its unit row is 0 (as in TorchJD), and d is ConFIG of the others."""
    J = random_jacobian(3, 8, None, seed=4).double()
    with_zero = torch.cat([J, torch.zeros(1, 8, dtype=torch.float64)])
    torch.testing.assert_close(get("config")(with_zero), get("config")(J), rtol=1e-9, atol=1e-12)
