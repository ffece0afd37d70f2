"""Krum and Multi-Krum (Blanchard et al. 2017): the gradient(s) closest to their nearest neighbours."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, ResumesBitForBit, StrictOptions, jacobians,
    make, random_jacobian,
)

from mtlcore.aggregators import get


class TestKrum(ExpectedStructure, Homogeneous, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "krum"
    configurations = [{}, {"n_selected": 2}]
    bad_options = [({"n_byzantine": -1}, "krum: option n_byzantine must be an int >= 0, got -1"),
                   ({"n_selected": 0}, "krum: option n_selected must be an int >= 1, got 0")]


def brute_force(J: np.ndarray, f: int, m: int) -> np.ndarray:
    """Blanchard et al.'s Krum written out: s(i) = Σ of the K − f − 2 smallest ‖g_i − g_j‖², j ≠ i; the mean of the
    m gradients of lowest score (ties to the lower index)."""
    K = len(J)
    scores = [sum(sorted(float(((J[i] - J[j]) ** 2).sum()) for j in range(K) if j != i)[: K - f - 2])
              for i in range(K)]
    chosen = sorted(range(K), key=lambda i: (scores[i], i))[:m]
    return J[chosen].mean(axis=0)


def test_selection_by_hand():
    J = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    # two neighbours each: s = (1+9, 1+4, 4+9, 49+64) → g₁; Multi-Krum of 2: mean of g₁ and g₀
    torch.testing.assert_close(get("krum")(J), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(get("krum", n_selected=2)(J), torch.tensor([0.5, 0.0]))
    # one neighbour with n_byzantine=1: s = (1, 1, 4, 49), a tie of g₀ and g₁ → g₀
    agg = get("krum", n_byzantine=1)
    torch.testing.assert_close(agg(J), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("f, m", [(0, 1), (1, 1), (0, 3), (2, 2)])
def test_against_brute_force(f, m):
    for seed, (K, P) in enumerate(itertools.product((5, 6, 9), (3, 20))):
        J = random_jacobian(K, P, None, seed=seed).double()
        J[-1] *= 5.0  # an outlier
        d = get("krum", n_byzantine=f, n_selected=m)(J)
        np.testing.assert_allclose(d.numpy(), brute_force(J.numpy(), f, m), rtol=0, atol=1e-12)


def test_update_is_the_weighted_sum_and_the_gramian_gives_the_weights():
    for J in jacobians():
        if J.shape[0] < 3:
            continue
        agg = make("krum", J.shape[0])
        d = agg(J.double())
        torch.testing.assert_close(agg.weights @ J.double(), d, rtol=0, atol=0)
        torch.testing.assert_close(make("krum", J.shape[0]).weighting(J.double() @ J.double().T), agg.weights)


def test_too_few_tasks_are_refused():
    with pytest.raises(ValueError, match=r"krum: needs at least n_byzantine \+ 3 = 4 and n_selected = 1 tasks, got 3"):
        get("krum", n_byzantine=1).reset(3)
    with pytest.raises(ValueError, match="n_selected = 5 tasks, got 4"):
        get("krum", n_selected=5)(torch.randn(4, 3))


def test_agrees_with_torchjd_where_distances_and_squared_distances_select_alike():
    """TorchJD scores by the sum of distances, the paper by squared distances: where both choose the same rows the
    outputs are equal; the cases where they choose differently are counted, not compared."""
    tjd = pytest.importorskip("torchjd.aggregation")
    compared = 0
    for seed in range(40):
        J = random_jacobian(7, 10, None, seed=seed).double() * torch.linspace(0.5, 3.0, 7, dtype=torch.float64)[:, None]
        distances = torch.cdist(J, J)
        unsquared = (torch.sort(distances, dim=1).values[:, 1 : 7 - 1 - 2 + 1]).sum(dim=1)
        squared = (torch.sort(distances**2, dim=1).values[:, 1 : 7 - 1 - 2 + 1]).sum(dim=1)
        if int(unsquared.argmin()) != int(squared.argmin()):
            continue
        compared += 1
        torch.testing.assert_close(get("krum", n_byzantine=1)(J), tjd.Krum(n_byzantine=1)(J), rtol=0, atol=1e-12)
    assert compared >= 20
