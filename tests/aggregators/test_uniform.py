"""Uniform weights: d = Σ g_k or their mean."""
from __future__ import annotations

import torch
from _properties import (
    J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, LinearUnderScaling,
    PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, random_jacobian,
)

from mtlcore.aggregators import get


class TestUniform(ExpectedStructure, Weighted, PermutationInvariant, LinearUnderScaling, Homogeneous, Deterministic,
                  ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "uniform"
    configurations = [{}, {"reduction": "mean"}]
    bad_options = [({"reduction": "max"}, "uniform: reduction must be 'sum' or 'mean'")]


def test_known_outputs():
    torch.testing.assert_close(get("uniform")(J_REFERENCE), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(get("uniform", reduction="mean")(J_REFERENCE), torch.tensor([1.0, 1.0, 1.0]))


def test_weights_are_reused_but_not_shared():
    """The weights are computed once: editing agg.weights cannot change later updates, and a new dtype gets its own
    weight vector."""
    J = random_jacobian(2, 6, None, seed=21)
    agg = get("uniform")
    first = agg(J)
    recorded = agg.weights.clone()
    agg.weights.mul_(10.0)
    torch.testing.assert_close(agg(J), first)
    torch.testing.assert_close(agg.weights, recorded)  # the record is not the cache either
    torch.testing.assert_close(agg(J.double()), J.double().sum(dim=0))
