"""Fixed weights: d = Σ w_k g_k with w given."""
from __future__ import annotations

import math

import pytest
import torch
from _properties import (
    J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, LinearUnderScaling,
    ResumesBitForBit, StrictOptions, Weighted, random_jacobian,
)

from mtlcore.aggregators import NonFiniteGradientError, get


class TestFixed(ExpectedStructure, Weighted, LinearUnderScaling, Homogeneous, Deterministic, ResumesBitForBit,
                StrictOptions, DivergenceDetection):
    name = "fixed"  # `make` gives it the weights 1/(k+1)
    bad_options = [
        ({}, "fixed: weights must be a non-empty list"),
        ({"weights": ["a"]}, "fixed: weights must be a non-empty list"),
        ({"weights": ["1", "2"]}, "fixed: weights must be a non-empty list"),
        ({"weights": [True]}, "fixed: weights must be a non-empty list"),
        ({"weights": [1.0, math.inf]}, "fixed: weights must be a non-empty list"),
    ]


def test_weights_must_match_the_task_count():
    with pytest.raises(ValueError, match="fixed: 1 weights were given for 2 tasks"):
        get("fixed", weights=[1.0])(J_REFERENCE)
    fixed = get("fixed", weights=[1.0, 2.0])
    fixed.reset(2)
    with pytest.raises(ValueError, match="fixed: 2 weights were given for 3 tasks"):
        fixed.reset(3)
    assert fixed.num_tasks == 2 and torch.equal(fixed(J_REFERENCE), 1.0 * J_REFERENCE[0] + 2.0 * J_REFERENCE[1])


def test_weights_are_reused_but_not_shared():
    J = random_jacobian(2, 6, None, seed=21)
    agg = get("fixed", weights=[0.5, 2.0])
    first = agg(J)
    recorded = agg.weights.clone()
    agg.weights.mul_(10.0)
    torch.testing.assert_close(agg(J), first)
    torch.testing.assert_close(agg.weights, recorded)
    torch.testing.assert_close(agg(J.double()), torch.tensor([0.5, 2.0], dtype=torch.float64) @ J.double())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_entries_are_caught_in_d_even_on_a_row_of_weight_zero(bad):
    """Uniform and fixed weights skip G and check d = Jᵀw instead of J: 0·inf is NaN, so a bad entry shows there."""
    J = random_jacobian(3, 50, None, seed=12)
    J[0, 17] = bad
    with pytest.raises(NonFiniteGradientError, match="fixed: the task gradients J contain NaN or inf"):
        get("fixed", weights=[0.0, 1.0, 2.0])(J)
