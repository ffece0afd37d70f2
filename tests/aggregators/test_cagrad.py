"""CAGrad (Liu et al. 2021): the best worst-task improvement within a ball around the mean gradient."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _properties import (
    J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, PermutationInvariant,
    ResumesBitForBit, StrictOptions, Weighted, make, random_jacobian,
)

import mtlcore.aggregators as aggregators
from mtlcore.aggregators import get


class TestCAGrad(ExpectedStructure, Weighted, PermutationInvariant, Homogeneous, Deterministic, ResumesBitForBit,
                 StrictOptions, DivergenceDetection):
    name = "cagrad"
    configurations = [{}, {"c": 0.2, "rescale": 2}]
    tolerance = 1e-3  # SLSQP stops within its tolerance, on a flat objective
    bad_options = [({"c": -1.0}, "cagrad: option c must be a number >= 0.0, got -1.0"),
                   ({"rescale": 3}, "cagrad: rescale must be 0")]


@pytest.mark.parametrize("rescale, divisor", [(0, 1.0), (1, 1.25)])
def test_known_outputs(rescale, divisor):
    """The known output on the reference J (rescale 0; TorchJD's documentation), and d/(1 + c²) for the default rescale 1."""
    agg = make("cagrad", c=0.5, rescale=rescale)
    d = agg(J_REFERENCE)
    torch.testing.assert_close(d, torch.tensor([0.1835, 1.2041, 1.2041]) / divisor, atol=1e-4, rtol=0)
    torch.testing.assert_close(agg.weights.float() @ J_REFERENCE, d, atol=1e-4, rtol=1e-4)


def test_c_zero_is_the_mean():
    J = random_jacobian(3, 10, None, seed=6)
    torch.testing.assert_close(make("cagrad", 3, c=0.0)(J), J.mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed, shape", [(0, (10, 50)), (1, (3, 7)), (2, (5, 100))])
def test_weights_satisfy_the_kkt_conditions(seed, shape):
    """w minimises F(w) = wᵀJg₀ + c‖g₀‖‖Jᵀw‖ over the simplex: ∂F/∂w_i is equal on the support and no smaller off
    it. SLSQP's default (absolute) ftol stopped 2% away from this on seed 0."""
    J = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))
    c, K = 0.5, shape[0]
    weights = get("cagrad", c=c, rescale=0)(J) @ torch.linalg.pinv(J)  # d = Jᵀ(1/K + λw)
    weights = weights.numpy()
    lam = weights.sum() - 1.0
    w = (weights - 1.0 / K) / lam
    G = (J @ J.T).numpy()
    g0 = np.full(K, 1.0 / K)
    grad = G @ g0 + c * np.sqrt(g0 @ G @ g0) * (G @ w) / np.sqrt(w @ G @ w)
    support = w > 1e-6
    scale = np.abs(grad).max()
    assert np.ptp(grad[support]) < 1e-6 * scale
    assert (grad[~support] >= grad[support].min() - 1e-6 * scale).all()


def test_solver_failure_falls_back_to_the_mean(monkeypatch, caplog):
    class Failed:
        success, message, x = False, "forced failure", np.array([math.nan, math.nan])

    monkeypatch.setattr(aggregators.cagrad, "minimize", lambda *args, **kwargs: Failed())
    agg = make("cagrad")
    with caplog.at_level(logging.WARNING, logger="mtlcore.aggregators"):
        d = agg(J_REFERENCE)
    assert "cagrad: solver failed" in caplog.text
    torch.testing.assert_close(d, J_REFERENCE.mean(dim=0))
