"""MoDo (Chen et al. 2023): task weights from two independent batches, the update from a third."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _multi_batch import MultiBatch, batches
from _properties import StrictOptions

from mtlcore.aggregators import get
from mtlcore.aggregators.modo import project_onto_simplex


class TestMoDo(MultiBatch, StrictOptions):
    name = "modo"
    configurations = [{}, {"gamma": 0.1, "rho": 0.0}]
    bad_options = [({"gamma": -1.0}, "modo: option gamma must be a number >= 0.0, got -1.0"),
                   ({"rho": "x"}, "modo: option rho must be a number")]


def projection_by_supports(v: np.ndarray) -> np.ndarray:
    """The projection onto the simplex by brute force: among the points w_S = (v_S − τ_S)⁺ with Σ w_S = 1 for every
    support S, the feasible one closest to v."""
    best, best_distance = None, np.inf
    for size in range(1, len(v) + 1):
        for support in itertools.combinations(range(len(v)), size):
            tau = (v[list(support)].sum() - 1.0) / size
            w = np.zeros_like(v)
            w[list(support)] = v[list(support)] - tau
            if (w >= -1e-15).all() and np.linalg.norm(w - v) < best_distance:
                best, best_distance = w, np.linalg.norm(w - v)
    return best


def test_simplex_projection_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.normal(size=rng.integers(1, 7)) * rng.choice([0.1, 1.0, 10.0])
        w = project_onto_simplex(torch.from_numpy(v)).numpy()
        np.testing.assert_allclose(w, projection_by_supports(v), rtol=0, atol=1e-12)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()


def libmtl_loop(steps, gamma, rho):
    """LibMTL's MoDo.backward (the authors' code), in numpy: λ ← Π(λ − γ(J₀(J₁ᵀλ) + ρλ)), d = J₂ᵀλ (its batches
    0 and 1 for λ, 2 for the update; here ξ, ξ' and ζ)."""
    K = len(steps[0][0])
    lambd, out = np.full(K, 1.0 / K), []
    for J_zeta, J_xi, J_xi2 in steps:
        y = lambd - gamma * (J_xi @ (J_xi2.T @ lambd) + rho * lambd)
        order, total, tmax = np.sort(y)[::-1], 0.0, (y.sum() - 1.0) / K  # its _projection2simplex
        for i in range(K - 1):
            total += order[i]
            if (total - 1) / (i + 1.0) > order[i + 1]:
                tmax = (total - 1) / (i + 1.0)
                break
        lambd = np.maximum(y - tmax, 0.0)
        out.append((J_zeta.T @ lambd, lambd.copy()))
    return out


@pytest.mark.parametrize("gamma, rho", [(1e-3, 0.1), (0.2, 0.05)])
def test_against_libmtls_loop(gamma, rho):
    steps = [[J.double() for J in batches(s, num_tasks=4)] for s in range(6)]
    agg = get("modo", gamma=gamma, rho=rho)
    for jacobians, (d, lambd) in zip(steps, libmtl_loop([[J.numpy() for J in js] for js in steps], gamma, rho)):
        np.testing.assert_allclose(agg.aggregate_batches(jacobians).numpy(), d, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(agg.weights.numpy(), lambd, rtol=1e-10, atol=1e-15)


def test_first_step_by_hand():
    """λ₀ = (½, ½), ρ = 0: one projected step along J_ξJ_ξ'ᵀλ, and d = J_ζᵀλ with J_ζ = I."""
    J_xi = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    J_xi2 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # cross = [[4, 2], [0, 0]]
    agg = get("modo", gamma=0.1, rho=0.0)
    d = agg.aggregate_batches([torch.eye(2, dtype=torch.float64), J_xi, J_xi2])
    # cross·λ = (3, 0): λ − 0.1·(3, 0) = (0.2, 0.5), projected: τ = −0.15 → (0.35, 0.65)
    torch.testing.assert_close(agg.weights, torch.tensor([0.35, 0.65], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([0.35, 0.65], dtype=torch.float64))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours, theirs = get("modo", gamma=0.05, rho=0.1), tjd.MoDoWeighting(gamma=0.05, rho=0.1)
    for step in range(6):
        jacobians = [J.double() for J in batches(step, num_tasks=5)]
        ours.aggregate_batches(jacobians)
        torch.testing.assert_close(ours.weights, theirs(jacobians[1] @ jacobians[2].T), rtol=1e-12, atol=1e-14)
