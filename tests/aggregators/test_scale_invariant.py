"""Scale-invariant loss: Σ log(L_i + ε)."""
from __future__ import annotations

import math

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestScaleInvariant(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "scale_invariant"
    configurations = [{}, {"eps": 0.0}]
    bad_options = [({"eps": -1e-8}, "scale_invariant: option eps must be a number >= 0.0")]


def test_value_and_weights_by_hand():
    agg = get("scale_invariant", eps=0.0)
    assert agg.combine(torch.tensor([2.0, 3.0])).item() == pytest.approx(math.log(6.0))
    torch.testing.assert_close(agg.weights, torch.tensor([0.5, 1 / 3], dtype=torch.float64))
