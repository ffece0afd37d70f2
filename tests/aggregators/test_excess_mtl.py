"""ExcessMTL (He et al. 2024): task weights driven by the tasks' estimated excess risks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, ResumesBitForBit, StrictOptions, random_jacobian,
)

from mtlcore.aggregators import get


class TestExcessMTL(ExpectedStructure, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "excess_mtl"
    configurations = [{}, {"robust_step_size": 1.0}]
    bad_options = [({"robust_step_size": -0.1}, "excess_mtl: option robust_step_size must be a number >= 0.0")]


def authors_loop(jacobians: list[np.ndarray], step_size: float) -> list[np.ndarray]:
    """The authors' (and LibMTL's) ExcessMTL.backward, in numpy: the loss weights of every step."""
    weights, squared, initial, out = np.ones(len(jacobians[0])), np.zeros_like(jacobians[0]), None, []
    for J in jacobians:
        squared = squared + J**2
        excess = np.array([g * (1 / np.sqrt(s + 1e-7)) @ g for g, s in zip(J, squared)])
        if initial is None:
            initial = excess
        else:
            weights = weights * np.exp(excess / initial * step_size)
            weights = weights / weights.sum() * len(weights)
        out.append(weights.copy())
    return out


@pytest.mark.parametrize("step_size", [1e-2, 1.0])
def test_against_the_authors_loop(step_size):
    jacobians = [random_jacobian(4, 12, None, seed=s).double() * (1 + s) for s in range(6)]
    agg = get("excess_mtl", robust_step_size=step_size)
    for J, expected in zip(jacobians, authors_loop([J.numpy() for J in jacobians], step_size)):
        d = agg(J)
        np.testing.assert_allclose(agg.weights.numpy(), expected, rtol=1e-12)
        torch.testing.assert_close(d, agg.weights @ J, rtol=1e-12, atol=1e-12)


def test_first_step_by_hand_and_a_task_with_larger_excess_gains_weight():
    J1 = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    agg = get("excess_mtl", robust_step_size=0.5)
    torch.testing.assert_close(agg(J1), J1.sum(dim=0))  # w = 1 at the first step
    # e⁰ = Σ g²/√(g² + 1e-7) ≈ ‖g‖₁: (7, 1)
    torch.testing.assert_close(agg.initial_excess, torch.tensor([7.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)
    agg(torch.tensor([[3.0, 4.0], [10.0, 0.0]], dtype=torch.float64))  # task 2's gradient grows tenfold
    assert agg.weights[1] > 1 > agg.weights[0] and agg.weights.sum().item() == pytest.approx(2.0)


def test_a_zero_first_gradient_gets_no_increase_instead_of_nan():
    agg = get("excess_mtl", robust_step_size=1.0)
    agg(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    agg(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert torch.isfinite(agg.weights).all() and agg.weights[0] > agg.weights[1]


def test_agrees_with_torchjd_but_for_its_first_step():
    """TorchJD's ExcessMTL starts from 1/K and already updates at the first step with the raw excess e⁰ (the authors'
    code keeps w = 1 there); later steps multiply by the same exp(η e/e⁰) (TorchJD: e⁰ + 1e-7). So TorchJD's
    weights times exp(−η e⁰), renormalised to Σ = K, are these."""
    tjd = pytest.importorskip("torchjd.aggregation")
    step_size = 0.5
    ours, theirs = get("excess_mtl", robust_step_size=step_size), tjd.ExcessMTLWeighting(robust_step_size=step_size)
    for step in range(5):
        J = random_jacobian(4, 12, None, seed=step).double() * (1 + step)
        ours(J)
        undone = theirs(J) * torch.exp(-step_size * ours.initial_excess)
        torch.testing.assert_close(ours.weights, 4 * undone / undone.sum(), rtol=1e-6, atol=0)
