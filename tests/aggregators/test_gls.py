"""GLS (Chennupati et al. 2019): the geometric mean of the task losses."""
from __future__ import annotations

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestGLS(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "gls"


def test_value_and_weights_by_hand():
    agg = get("gls")
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    total = agg.combine(losses)
    assert total.item() == pytest.approx(2.0)  # √(1·4)
    total.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.25]))  # GM / (K L_k)
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_gradient_is_the_geometric_means_by_autograd():
    """The update on a model's parameters is the gradient of (Π L_k)^{1/K} written as a product."""
    W = torch.nn.Parameter(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))
    scales = torch.tensor([0.5, 2.0, 7.0, 0.1], dtype=torch.float64)

    def losses():
        return torch.stack([(s * (W - k)).square().sum() for k, s in enumerate(scales)])

    (ours,) = torch.autograd.grad(get("gls").combine(losses()), W)
    (truth,) = torch.autograd.grad(losses().prod() ** (1 / 4), W)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=0)


def test_many_small_losses_do_not_underflow():
    losses = torch.full((40,), 1e-3)  # their product, 1e-120, is 0 in float32
    assert losses.prod().item() == 0.0
    assert get("gls").combine(losses).item() == pytest.approx(1e-3, rel=1e-5)
