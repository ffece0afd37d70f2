"""MGDA-UB: MGDA's weights from the Jacobian of the shared representation, applied to the shared parameters."""
from __future__ import annotations

import torch
from _properties import (
    J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, NonConflicting,
    PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, make, random_jacobian,
)


class TestMGDAUB(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Homogeneous, Deterministic,
                 ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "mgda_ub"


def test_weights_from_the_representation_are_mgdas():
    agg = make("mgda_ub")
    assert agg.jacobian_of == "representation" and make("mgda").jacobian_of == "shared"
    torch.testing.assert_close(agg.weights_from(J_REFERENCE), torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(agg.weights, torch.tensor([0.6, 0.4], dtype=torch.float64))
    J = random_jacobian(4, 30, None, seed=3)
    mgda = make("mgda")
    mgda(J)
    torch.testing.assert_close(make("mgda_ub").weights_from(J), mgda.weights, rtol=0, atol=0)
