"""FAMO (Liu et al. 2023): fast adaptive multitask optimisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import NonFiniteGradientError, get


class TestFAMO(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "famo"
    configurations = [{}, {"gamma": 0.0, "lr": 0.1}]
    bad_options = [({"gamma": "big"}, "famo: option gamma must be a number")]


def test_one_step_by_hand():
    agg = get("famo", gamma=1e-3, lr=0.025, eps=0.0)
    before = torch.tensor([1.0, 4.0], requires_grad=True)
    total = agg.combine(before)
    # z = ½ each; c = ½(1/1 + 1/4) = 0.625; loss = ½(log 1 + log 4)/c
    assert total.item() == pytest.approx(0.5 * math.log(4.0) / 0.625, rel=1e-6)
    total.backward()
    torch.testing.assert_close(before.grad, torch.tensor([0.5 / 0.625, 0.125 / 0.625]))
    torch.testing.assert_close(agg.weights, torch.tensor([0.8, 0.2], dtype=torch.float64))
    after = torch.tensor([0.5, 3.0])
    agg.after_step(after)
    delta = np.log([1.0, 4.0]) - np.log([0.5, 3.0])
    grad = 0.5 * (delta - delta.mean())  # softmax Jacobian at z = ½: diag(z) − zzᵀ
    # Adam's first step (m̂ = g, v̂ = g², weight decay on ξ = 0 adds nothing): ξ = −lr·g/(|g| + 1e-8)
    expected = -0.025 * grad / (np.abs(grad) + 1e-8)
    np.testing.assert_allclose(agg.logits.detach().numpy(), expected, rtol=1e-5)


def test_after_step_needs_a_combine_and_finite_losses():
    agg = get("famo")
    assert agg.needs_losses_after
    agg.reset(2)
    with pytest.raises(ValueError, match="after_step\\(\\) needs a combine\\(\\) call before it"):
        agg.after_step(torch.ones(2))
    agg.combine(torch.ones(2))
    with pytest.raises(NonFiniteGradientError):
        agg.after_step(torch.tensor([1.0, math.nan]))
