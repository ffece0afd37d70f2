"""Nash-MTL (Navon et al. 2022): the bargaining solution α > 0 with Gα = 1/α, d = Jᵀα clipped to max_norm."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _properties import (
    CASES, J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, NonConflicting, PermutationInvariant,
    ResumesBitForBit, StrictOptions, Weighted, is_full_row_rank, jacobians, make, random_jacobian,
)

from mtlcore.aggregators import get


class TestNashMTL(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Deterministic, ResumesBitForBit,
                  StrictOptions, DivergenceDetection):
    """Not Homogeneous: ‖d‖ = min(√K, max_norm) whatever the scale (below)."""

    name = "nashmtl"
    configurations = [{}, {"update_weights_every": 2, "max_norm": 0.0}]
    full_rank_only = True  # Gα = 1/α has no solution for dependent gradients: the previous α is kept
    bad_options = [({"update_weights_every": 0}, "nashmtl: option update_weights_every must be an int >= 1"),
                   ({"max_norm": -1.0}, "nashmtl: option max_norm must be a number >= 0.0")]


def test_known_output():
    """TorchJD's documented example."""
    torch.testing.assert_close(make("nashmtl")(J_REFERENCE), torch.tensor([0.0542, 0.7061, 0.7061]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("J", [J for J in jacobians() if is_full_row_rank(J)],
                         ids=[f"K{k}-P{p}" for (k, p, r), J in zip(CASES, jacobians()) if is_full_row_rank(J)])
def test_bargaining_condition(J):
    agg = make("nashmtl")
    d = agg(J)
    alpha = agg.alpha.numpy()
    G = (J.double() @ J.double().T).numpy()
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (G @ alpha), np.ones(len(alpha)), rtol=1e-6)
    # ‖Jᵀα‖² = Σ α_i (Gα)_i = K, so the clip leaves ‖d‖ = min(√K, max_norm)
    assert d.norm().item() == pytest.approx(min(math.sqrt(len(alpha)), 1.0), rel=1e-4)


@pytest.mark.parametrize("options", [{}, {"max_norm": 0.0}])
def test_output_does_not_depend_on_the_scale(options):
    J = random_jacobian(3, 10, None, seed=8)
    d = make("nashmtl", 3, **options)(J)
    torch.testing.assert_close(make("nashmtl", 3, **options)(1e3 * J), d, rtol=1e-4, atol=1e-6)


def test_solves_every_well_posed_random_problem(caplog):
    """Gα = 1/α to 1e-8 on 200 random full-rank J; the Newton line search used to stall at residuals ~1e-8 (and
    keep the previous α) in 1-3% of them, e.g. seed 10 below."""
    rng = np.random.default_rng(10)
    J = torch.from_numpy(rng.standard_normal((5, 100)))
    agg = get("nashmtl", max_norm=0.0)
    agg(J)
    np.testing.assert_allclose(agg.alpha.numpy(), [0.11379691, 0.07808453, 0.09448382, 0.09191362, 0.09242012],
                               rtol=1e-6)
    with caplog.at_level("WARNING", logger="mtlcore.aggregators"):
        for seed in range(200):
            rng = np.random.default_rng(seed)
            J = torch.from_numpy(rng.standard_normal(((2, 3, 5, 10)[seed % 4], 100)))
            agg = get("nashmtl", max_norm=0.0)
            agg(J)
            G, alpha = (J @ J.T).numpy(), agg.alpha.numpy()
            assert np.abs(alpha * (G @ alpha) - 1).max() < 1e-8, seed
    assert "solver failed" not in caplog.text


def test_solver_failure_keeps_the_previous_weights(caplog):
    J = random_jacobian(3, 10, None, seed=13)
    J[1] = 0.0  # a zero gradient: Gα = 1/α has no solution
    agg = make("nashmtl", 3)
    with caplog.at_level(logging.WARNING, logger="mtlcore.aggregators"):
        d = agg(J)
    assert "nashmtl: solver failed" in caplog.text
    torch.testing.assert_close(agg.alpha, torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(d).all() and d.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_weights_are_recomputed_every_update_weights_every_steps():
    agg = make("nashmtl", 3, update_weights_every=2, max_norm=0.0)
    first, second, third = (random_jacobian(3, 10, None, seed=s) for s in (1, 2, 3))
    agg(first)
    alpha = agg.alpha.clone()
    agg(second)
    torch.testing.assert_close(agg.alpha, alpha, rtol=0, atol=0)
    agg(third)
    G = third.double() @ third.double().T
    torch.testing.assert_close(agg.alpha * (G @ agg.alpha), torch.ones(3, dtype=torch.float64), rtol=1e-8, atol=0)


def test_reset_clears_the_state():
    agg = make("nashmtl")
    agg(J_REFERENCE)
    agg.reset(2)
    torch.testing.assert_close(agg.alpha, torch.ones(2, dtype=torch.float64))
    assert torch.isnan(agg.weights).all() and agg.step == 0
