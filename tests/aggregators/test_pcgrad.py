"""PCGrad (Yu et al. 2020): each gradient projected off the others it conflicts with, in a random order."""
from __future__ import annotations

import pytest
import torch
from _properties import (
    J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, LinearUnderScaling,
    ResumesBitForBit, StrictOptions, Weighted, make, random_jacobian, two_task_jacobians,
)

from mtlcore.aggregators.pcgrad import others_in_random_order


class TestPCGrad(ExpectedStructure, Weighted, LinearUnderScaling, Homogeneous, Deterministic, ResumesBitForBit,
                 StrictOptions, DivergenceDetection):
    """Not permutation invariant beyond two tasks: the order of the projections is drawn."""

    name = "pcgrad"
    configurations = [{}, {"reduction": "mean"}]
    bad_options = [({"reduction": "max"}, "pcgrad: reduction must be 'sum' or 'mean'")]


def test_known_output():
    """The known output on the reference J (TorchJD's documentation)."""
    torch.testing.assert_close(make("pcgrad")(J_REFERENCE), torch.tensor([0.5848, 3.8012, 3.8012]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("J", two_task_jacobians())
def test_two_tasks_equal_upgrad_and_do_not_depend_on_the_order(J):
    pcgrad = make("pcgrad", reduction="mean")(J)
    torch.testing.assert_close(pcgrad, make("upgrad", reg_eps=0.0)(J), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(make("pcgrad", reduction="mean")(J.flip(0)), pcgrad, rtol=1e-6, atol=1e-7)


def test_follows_the_sequential_projections_of_the_paper():
    """Yu et al.'s Alg. 1 written out on the float64 rows, with the same task orders."""
    J = random_jacobian(5, 20, None, seed=4).double()
    d = make("pcgrad", 5, seed=3)(J)
    orders = others_in_random_order(5, torch.Generator().manual_seed(3))
    expected = torch.zeros(20, dtype=torch.float64)
    for i in range(5):
        g = J[i].clone()
        for j in orders[i].tolist():
            if g @ J[j] < 0:
                g -= (g @ J[j]) / (J[j] @ J[j]) * J[j]
        expected += g
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)


def test_orders_are_one_permutation_per_task_without_the_task_itself():
    orders = others_in_random_order(6, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    for i, order in enumerate(orders):
        drawn = torch.randperm(6, generator=generator)
        assert order.tolist() == [j for j in drawn.tolist() if j != i]
