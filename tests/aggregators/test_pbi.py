"""PBI (Zhang & Li 2007): penalty-based boundary intersection of the losses with a preference ray."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestPBI(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "pbi"
    configurations = [{}, {"preference": [1.0, 2.0, 3.0], "theta": 1.0}]
    bad_options = [({"theta": -1.0}, "pbi: option theta must be a number >= 0.0, got -1.0"),
                   ({"preference": [1.0, -2.0]}, "pbi: preference must be None or a list of positive finite numbers"),
                   ({"preference": "equal"}, "pbi: preference must be None or a list of positive finite numbers")]


def pbi_by_geometry(losses: np.ndarray, preference: np.ndarray, theta: float) -> float:
    unit = preference / np.linalg.norm(preference)
    d1 = losses @ unit
    return d1 + theta * np.linalg.norm(losses - d1 * unit)


def test_value_by_hand():
    # p̂ = (1, 1)/√2: d₁ = 4/√2 = 2√2, d₂ = ‖(3, 1) − (2, 2)‖ = √2, PBI = 2√2 + 5√2
    assert get("pbi").combine(torch.tensor([3.0, 1.0])).item() == pytest.approx(7 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_value_and_gradient_of_the_definition(seed):
    """combine is d₁ + θd₂ and its gradient (the weights) that of d₁ + θd₂ written out, by autograd."""
    rng = np.random.default_rng(seed)
    losses = torch.tensor(rng.uniform(0.1, 3.0, 4), requires_grad=True)
    preference, theta = rng.uniform(0.2, 2.0, 4), float(rng.uniform(0.0, 10.0))
    agg = get("pbi", preference=preference.tolist(), theta=theta)
    total = agg.combine(losses)
    assert total.item() == pytest.approx(pbi_by_geometry(losses.detach().numpy(), preference, theta), rel=1e-12)
    unit = torch.tensor(preference / np.linalg.norm(preference))
    d1 = losses @ unit
    (truth,) = torch.autograd.grad(d1 + theta * (losses - d1 * unit).norm(), losses)
    torch.testing.assert_close(agg.weights, truth, rtol=1e-12, atol=1e-12)


def test_on_the_preference_ray_the_weights_are_the_preference():
    agg = get("pbi", preference=[1.0, 3.0])
    agg.combine(torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 3.0], dtype=torch.float64) / math.sqrt(10))


def test_preference_of_another_length_is_refused():
    with pytest.raises(ValueError, match="pbi: preference has 2 entries for 3 tasks"):
        get("pbi", preference=[1.0, 2.0]).reset(3)
