"""FairGrad (Ban & Ji 2024): α-fair weights, Gw = w^{−1/α}."""
from __future__ import annotations

import logging

import pytest
import torch
from _properties import (
    CASES, Deterministic, DivergenceDetection, ExpectedStructure, PermutationInvariant, ResumesBitForBit,
    StrictOptions, Weighted, is_full_row_rank, jacobians, random_jacobian,
)

from mtlcore.aggregators import get


class TestFairGrad(ExpectedStructure, Weighted, PermutationInvariant, Deterministic, ResumesBitForBit,
                   StrictOptions, DivergenceDetection):
    name = "fairgrad"
    configurations = [{}, {"alpha": 0.5}, {"alpha": 3.0}]
    bad_options = [({"alpha": 0.0}, "fairgrad: option alpha must be a number > 0, got 0.0"),
                   ({"alpha": -1.0}, "fairgrad: option alpha must be a number >= 0.0, got -1.0"),
                   ({"max_iter": 0}, "fairgrad: option max_iter must be an int >= 1, got 0")]


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0, 5.0])
def test_alpha_fair_optimality_conditions(alpha):
    """w > 0 with (Gw)_k = w_k^{−1/α} for every task (the stationarity of Σ_k u_k^{1−α}/(1−α), u_k = g_kᵀd)."""
    for case, J in zip(CASES, jacobians()):
        if not is_full_row_rank(J):
            continue
        J = J.double()
        agg = get("fairgrad", alpha=alpha)
        d = agg(J)
        w = agg.weights
        assert (w > 0).all(), case
        torch.testing.assert_close(J @ d, w ** (-1 / alpha), rtol=1e-8, atol=0, msg=str(case))


def test_by_hand_for_orthogonal_gradients():
    """Orthogonal g_k: ‖g_k‖² w_k = w_k^{−1/α}, so w_k = ‖g_k‖^{−2α/(1+α)}."""
    J = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    agg = get("fairgrad", alpha=2.0)
    agg(J)
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) ** (-4 / 3))


def test_alpha_one_is_nash_mtl_unclipped():
    for seed, K in enumerate((2, 3, 6)):
        J = random_jacobian(K, 20, None, seed=seed).double()
        torch.testing.assert_close(get("fairgrad", alpha=1.0)(J), get("nashmtl", max_norm=0.0)(J), rtol=1e-9, atol=0)


def test_scale_of_the_update():
    """Scaling J by s scales the weights by s^{−2α/(1+α)}, so d by s^{(1−α)/(1+α)}."""
    J = random_jacobian(3, 10, None, seed=2).double()
    for alpha in (0.5, 2.0):
        d, d_scaled = get("fairgrad", alpha=alpha)(J), get("fairgrad", alpha=alpha)(10.0 * J)
        torch.testing.assert_close(d_scaled, 10.0 ** ((1 - alpha) / (1 + alpha)) * d, rtol=1e-9, atol=0)


def test_no_solution_falls_back_to_the_mean(caplog):
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)  # g₁ + g₂ = 0: no w solves it
    agg = get("fairgrad")
    with caplog.at_level(logging.WARNING, logger="mtlcore.aggregators"):
        d = agg(J)
    assert "fairgrad: solver failed" in caplog.text
    torch.testing.assert_close(d, J.mean(dim=0))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_agrees_with_torchjd(alpha):
    """TorchJD (as the authors' code) runs scipy's least_squares from 1/K: the same w up to its tolerance."""
    tjd = pytest.importorskip("torchjd.aggregation")
    for seed, (K, P) in enumerate([(2, 5), (3, 10), (5, 50), (8, 30)]):
        J = random_jacobian(K, P, None, seed=seed).double()
        theirs = tjd.FairGrad(alpha=alpha)(J)
        torch.testing.assert_close(get("fairgrad", alpha=alpha)(J), theirs, rtol=1e-6, atol=1e-9 * theirs.norm().item())
