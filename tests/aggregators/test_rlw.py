"""Random Loss Weighting (Lin et al. 2022): w = softmax(z), z ~ N(0, I), redrawn every step."""
from __future__ import annotations

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestRLW(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "rlw"


def test_weights_are_a_reproducible_softmax_of_normal_draws():
    agg = get("rlw", generator=torch.Generator().manual_seed(5))
    agg.combine(torch.ones(4))
    expected = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=0)
    torch.testing.assert_close(agg.weights, expected, rtol=0, atol=0)
    assert agg.weights.sum().item() == pytest.approx(1.0) and (agg.weights > 0).all()
    agg.combine(torch.ones(4))
    assert not torch.equal(agg.weights, expected)  # redrawn every step
