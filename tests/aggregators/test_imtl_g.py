"""IMTL-G (Liu et al. 2021): d has the same projection on every unit task gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    CASES, J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, PermutationInvariant,
    ResumesBitForBit, StrictOptions, Weighted, is_full_row_rank, jacobians, make,
)

from mtlcore.aggregators import get


class TestIMTLG(ExpectedStructure, Weighted, PermutationInvariant, Homogeneous, Deterministic, ResumesBitForBit,
                StrictOptions, DivergenceDetection):
    name = "imtl_g"


def test_known_output():
    """The known output on the reference J (TorchJD's documentation)."""
    torch.testing.assert_close(make("imtl_g")(J_REFERENCE), torch.tensor([0.0767, 1.0, 1.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("J", [J for J in jacobians() if is_full_row_rank(J)],
                         ids=[f"K{k}-P{p}" for (k, p, r), J in zip(CASES, jacobians()) if is_full_row_rank(J)])
def test_equal_projections(J):
    d = make("imtl_g")(J).double()
    units = J.double() / J.double().norm(dim=1, keepdim=True)
    projections = units @ d
    torch.testing.assert_close(projections, projections.mean().expand_as(projections), rtol=1e-4, atol=1e-6)


def test_keeps_a_small_independent_gradient():
    """The rank is judged on the unit gradients: a gradient 1e-6 times another's is still a task, and the
    projections of d on the unit gradients are equal (TorchJD and LibMTL agree)."""
    J = torch.tensor([[2e-6, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    agg = get("imtl_g")
    d = agg(J)
    np.testing.assert_allclose(agg.weights.numpy(), [1 / (1 + 2e-6), 2e-6 / (1 + 2e-6)], rtol=1e-9)
    projections = (J / J.norm(dim=1, keepdim=True)) @ d
    np.testing.assert_allclose(projections[0], projections[1], rtol=1e-9)
