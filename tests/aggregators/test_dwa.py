"""Dynamic Weight Average (Liu et al. 2019): weights from the last two epochs' loss ratios."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import NonFiniteGradientError, get


class TestDWA(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "dwa"
    configurations = [{}, {"temperature": 1.0}]
    bad_options = [({"temperature": 0.0}, "dwa: option temperature must be a number >= 1e-12")]


def test_weights_by_hand():
    agg = get("dwa", temperature=2.0)
    losses = torch.tensor([1.0, 2.0, 3.0])
    agg.combine(losses)
    torch.testing.assert_close(agg.weights, torch.ones(3, dtype=torch.float64))
    agg.end_epoch(torch.tensor([4.0, 2.0, 1.0]))
    agg.combine(losses)
    torch.testing.assert_close(agg.weights, torch.ones(3, dtype=torch.float64))  # still < 2 epochs
    agg.end_epoch(torch.tensor([2.0, 2.0, 2.0]))
    total = agg.combine(losses)
    ratios = np.array([2 / 4, 2 / 2, 2 / 1])
    expected = 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
    np.testing.assert_allclose(agg.weights.numpy(), expected, rtol=1e-12)
    assert total.item() == pytest.approx(float(expected @ losses.double().numpy()), rel=1e-6)


def test_end_epoch_checks_its_input():
    agg = get("dwa")
    with pytest.raises(ValueError, match="call reset"):
        agg.end_epoch(torch.ones(2))
    agg.reset(2)
    with pytest.raises(ValueError, match="expected 2 epoch mean losses, got 3"):
        agg.end_epoch(torch.ones(3))
    with pytest.raises(NonFiniteGradientError):
        agg.end_epoch(torch.tensor([1.0, math.nan]))
