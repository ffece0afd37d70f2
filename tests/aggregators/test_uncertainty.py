"""Uncertainty weighting (Kendall et al. 2018): Σ ½e^{−s_i} L_i + ½ s_i with learnable s = log σ²."""
from __future__ import annotations

import math

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestUncertainty(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "uncertainty"
    configurations = [{}, {"init": 0.5}]
    bad_options = [({"init": "zero"}, "uncertainty: option init must be a number")]


def test_value_and_gradient_by_hand():
    agg = get("uncertainty")
    agg.reset(2)
    (s,) = agg.parameters()
    with torch.no_grad():
        s.copy_(torch.tensor([0.0, math.log(4.0)]))
    losses = torch.tensor([2.0, 8.0], requires_grad=True)
    total = agg.combine(losses)
    # ½e^{-s}L + ½s: 1 + (1 + ½ log 4)
    assert total.item() == pytest.approx(1.0 + 1.0 + 0.5 * math.log(4.0), rel=1e-6)
    total.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 0.125]))
    # ∂/∂s = −½e^{-s}L + ½: [−1 + ½, −1 + ½]
    torch.testing.assert_close(s.grad, torch.tensor([-0.5, -0.5]))


def test_parameters_exist_after_reset_on_its_device():
    with pytest.raises(RuntimeError, match="reset"):
        get("uncertainty").parameters()
    agg = get("uncertainty", init=0.5)
    agg.reset(3, "cpu")
    (s,) = agg.parameters()
    assert s.requires_grad and torch.equal(s.detach(), torch.full((3,), 0.5))
