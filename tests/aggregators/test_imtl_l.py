"""IMTL-L (Liu et al. 2021): Σ e^{s_i} L_i − s_i with learnable s."""
from __future__ import annotations

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestIMTLL(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "imtl_l"
    configurations = [{}, {"init": -1.0}]


def test_value_and_gradient_by_hand():
    agg = get("imtl_l")
    agg.reset(2)
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    total = agg.combine(losses)
    assert total.item() == pytest.approx(5.0)
    total.backward()
    torch.testing.assert_close(agg.parameters()[0].grad, torch.tensor([1.0, 2.0]))  # e^s L − 1
