"""Coordinate-wise trimmed mean (Yin et al. 2018)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, ResumesBitForBit, StrictOptions,
    random_jacobian,
)

import mtlcore.aggregators.trimmed_mean as trimmed_mean_module
from mtlcore.aggregators import get


class TestTrimmedMean(ExpectedStructure, Homogeneous, Deterministic, ResumesBitForBit, StrictOptions,
                      DivergenceDetection):
    name = "trimmed_mean"
    configurations = [{}, {"trim_number": 0}]
    bad_options = [({"trim_number": -1}, "trimmed_mean: option trim_number must be an int >= 0, got -1")]


def numpy_trimmed_mean(J: np.ndarray, b: int) -> np.ndarray:
    return np.sort(J, axis=0)[b : len(J) - b].mean(axis=0)


def test_by_hand():
    J = torch.tensor([[1.0, -5.0], [2.0, 0.0], [9.0, 1.0], [-3.0, 1.0], [4.0, 100.0]])
    # column 0 sorted: -3, 1, 2, 4, 9 → mean(1, 2, 4); column 1: -5, 0, 1, 1, 100 → mean(0, 1, 1)
    torch.testing.assert_close(get("trimmed_mean")(J), torch.tensor([7 / 3, 2 / 3]))
    torch.testing.assert_close(get("trimmed_mean", trim_number=2)(J), torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("b", [0, 1, 2, 3])
def test_against_a_numpy_sort(b, monkeypatch):
    """Also across column blocks (made 7 columns wide here), with ties and a permuted row order."""
    for seed, (K, P) in enumerate([(7, 30), (8, 5), (11, 64)]):
        J = random_jacobian(K, P, None, seed=seed).double()
        J[:, ::3] = torch.round(J[:, ::3])  # ties
        expected = numpy_trimmed_mean(J.numpy(), b)
        agg = get("trimmed_mean", trim_number=b)
        np.testing.assert_allclose(agg(J).numpy(), expected, rtol=0, atol=1e-12)
        assert agg.weights.isnan().all()
        monkeypatch.setattr(trimmed_mean_module, "BLOCK_CPU", 7 * K)
        permuted = J[torch.randperm(K, generator=torch.Generator().manual_seed(seed))]
        np.testing.assert_allclose(get("trimmed_mean", trim_number=b)(permuted).numpy(), expected, rtol=0, atol=1e-12)
        monkeypatch.undo()


def test_zero_trim_is_the_mean_and_outliers_are_ignored():
    J = random_jacobian(5, 20, None, seed=3).double()
    torch.testing.assert_close(get("trimmed_mean", trim_number=0)(J), J.mean(dim=0))
    poisoned = J.clone()
    poisoned[0] = 1e6  # one adversarial task in every coordinate
    clean = get("trimmed_mean")(J)
    assert (get("trimmed_mean")(poisoned) - clean).abs().max() < J.abs().max()


def test_too_few_tasks_are_refused():
    with pytest.raises(ValueError, match=r"trimmed_mean: needs at least 2·trim_number \+ 1 = 5 tasks, got 4 tasks"):
        get("trimmed_mean", trim_number=2)(torch.randn(4, 3))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    for seed, b in enumerate([0, 1, 2]):
        J = random_jacobian(6, 40, None, seed=seed)
        torch.testing.assert_close(get("trimmed_mean", trim_number=b)(J), tjd.TrimmedMean(trim_number=b)(J))
