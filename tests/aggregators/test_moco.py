"""MoCo (Fernando et al. 2023): MGDA-like weights on tracked, bias-corrected task gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, ResumesBitForBit, StrictOptions, random_jacobian,
)

from mtlcore.aggregators import get


class TestMoCo(ExpectedStructure, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "moco"
    configurations = [{}, {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "rho": 0.1}]
    bad_options = [({"beta": 1.5}, "moco: option beta must be a number >= 0.0 <= 1.0, got 1.5"),
                   ({"rho": -1.0}, "moco: option rho must be a number >= 0.0, got -1.0")]


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def libmtl_loop(jacobians, losses, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
    """LibMTL's MoCo.backward (from the authors' code), in numpy: d and λ of every step."""
    K, P = jacobians[0].shape
    y, lambd, out = np.zeros((K, P)), np.full(K, 1.0 / K), []
    for step, (J, L) in enumerate(zip(jacobians, losses), start=1):
        grads = np.stack([g / (np.linalg.norm(g) + 1e-8) * l for g, l in zip(J, L)])
        y = y - (beta / step**beta_sigma) * (y - grads)
        lambd = softmax(lambd - (gamma / step**gamma_sigma) * (y @ y.T + rho * np.eye(K)) @ lambd)
        out.append((y.T @ lambd, lambd.copy()))
    return out


@pytest.mark.parametrize("options", [{}, {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "gamma_sigma": 0.2,
                                          "rho": 0.1}])
def test_against_libmtls_loop(options):
    jacobians = [random_jacobian(3, 15, None, seed=s).double() for s in range(5)]
    losses = [torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) * (1 - 0.1 * s) for s in range(5)]
    agg = get("moco", **options)
    expected = libmtl_loop([J.numpy() for J in jacobians], [L.numpy() for L in losses], **options)
    for J, L, (d, lambd) in zip(jacobians, losses, expected):
        np.testing.assert_allclose(agg(J, L).numpy(), d, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(agg.lambd.numpy(), lambd, rtol=1e-10)
        assert agg.weights.isnan().all()


def test_first_step_by_hand():
    """y₁ = β ĝ (y₀ = 0), λ₁ = softmax(1/K − γ y₁y₁ᵀ 1/K): orthogonal g of losses (1, 2) give y₁ = (e₁, 2e₂)/2."""
    J = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    agg = get("moco")
    d = agg(J, torch.tensor([1.0, 2.0], dtype=torch.float64))
    y = torch.tensor([[0.5 * 3.0 / (3.0 + 1e-8), 0.0], [0.0, 0.5 * 2.0 * 0.5 / (0.5 + 1e-8)]], dtype=torch.float64)
    lambd = torch.softmax(0.5 - 0.1 * (y @ y.T) @ torch.full((2,), 0.5, dtype=torch.float64), dim=0)
    torch.testing.assert_close(agg.lambd, lambd)
    torch.testing.assert_close(d, y.T @ lambd)


def test_with_beta_one_the_tracked_gradients_are_this_steps():
    agg = get("moco", beta=1.0, beta_sigma=0.0)
    for seed in range(3):
        J = random_jacobian(3, 7, None, seed=seed).double()
        losses = torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)
        agg(J, losses)
        torch.testing.assert_close(agg.tracked, J / (J.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None])
