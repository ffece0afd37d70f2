"""CR-MOGM (Zhou et al. 2022): the exponential moving average of another method's weights."""
from __future__ import annotations

import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, PermutationInvariant, ResumesBitForBit, StrictOptions,
    Weighted, make, random_jacobian,
)

from mtlcore.aggregators import get


class TestCRMOGM(ExpectedStructure, Weighted, PermutationInvariant, Deterministic, ResumesBitForBit, StrictOptions,
                 DivergenceDetection):
    name = "cr_mogm"
    configurations = [{}, {"base": "cagrad", "alpha": 0.5}, {"base": "mgda", "base_options": {"normalization": "loss"}}]
    bad_options = [({"alpha": 1.5}, "cr_mogm: option alpha must be a number >= 0.0 <= 1.0, got 1.5"),
                   ({"base": "cr_mogm"}, "cr_mogm: base must be another method than cr_mogm"),
                   ({"base": "graddrop"}, "cr_mogm: base must be a method that weighs the Gramian"),
                   ({"base": "mgda_ub"}, "cr_mogm: base must be a method that weighs the Gramian"),
                   ({"base": "mgda", "base_options": {"bogus": 1}}, "mgda: unknown option")]


@pytest.mark.parametrize("base", ["mgda", "cagrad", "upgrad"])
def test_the_ema_of_the_base_weights_by_hand(base):
    alpha, agg, plain = 0.7, get("cr_mogm", base=base, alpha=0.7), get(base)
    smoothed = None
    for seed in range(4):
        J = random_jacobian(3, 10, None, seed=seed).double()
        d = agg(J)
        plain(J)
        smoothed = plain.weights if smoothed is None else alpha * smoothed + (1 - alpha) * plain.weights
        torch.testing.assert_close(agg.weights, smoothed, rtol=1e-12, atol=0)
        torch.testing.assert_close(d, smoothed @ J, rtol=1e-12, atol=1e-12)


def test_alpha_zero_is_the_base_and_alpha_one_keeps_the_first_weights():
    zero, one, base = get("cr_mogm", alpha=0.0), get("cr_mogm", alpha=1.0), get("mgda")
    first = None
    for seed in range(3):
        J = random_jacobian(3, 10, None, seed=seed).double()
        torch.testing.assert_close(zero(J), base(J), rtol=0, atol=0)
        one(J)
        first = base.weights if first is None else first
        torch.testing.assert_close(one.weights, first, rtol=0, atol=0)


def test_a_randomised_base_draws_from_the_generator_it_is_given():
    agg = make("cr_mogm", 3, seed=5, base="pcgrad", alpha=0.0)
    assert agg.randomised and agg.draws_on_host and agg.generator_device("cuda") == torch.device("cpu")
    pcgrad = make("pcgrad", 3, seed=5)
    for seed in range(3):
        J = random_jacobian(3, 10, None, seed=seed).double()
        torch.testing.assert_close(agg(J), pcgrad(J), rtol=0, atol=0)


def test_a_randomised_base_resumes_bit_for_bit():
    """The base's generator state travels in the state: a new instance seeded otherwise continues the draws."""
    first = make("cr_mogm", 3, seed=1, base="pcgrad", alpha=0.5)
    jacobians = [random_jacobian(3, 10, None, seed=s).double() for s in range(6)]
    for J in jacobians[:3]:
        first(J)
    resumed = make("cr_mogm", 3, seed=99, base="pcgrad", alpha=0.5)
    resumed.reset(3)
    resumed.load_state_dict(first.state_dict())
    for J in jacobians[3:]:
        assert torch.equal(resumed(J), first(J))


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours = get("cr_mogm", base="imtl_g", alpha=0.8)
    theirs = tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(tjd.IMTLGWeighting(), alpha=0.8))
    for seed in range(5):
        J = random_jacobian(4, 20, None, seed=seed).double()
        torch.testing.assert_close(ours(J), theirs(J), rtol=1e-9, atol=1e-12)


def test_the_shared_generator_is_saved_once():
    """At the top level of the state, which a finished run's record leaves out; not again in the base's state."""
    agg = make("cr_mogm", 3, seed=1, base="pcgrad")
    agg(random_jacobian(3, 10, None, seed=0))
    state = agg.state_dict()
    assert "generator" in state and "generator" not in state["base"]


def test_spelling_out_a_base_default_names_the_same_run():
    from mtlcore.training.config import RunConfig

    base = {"setting": "fashion_mtl", "tasks": ["fashion1", "fashion2"], "aggregator": "cr_mogm"}
    implicit = RunConfig.from_dict({**base, "aggregator_options": {"base": "cagrad"}})
    explicit = RunConfig.from_dict({**base, "aggregator_options": {"base": "cagrad", "base_options": {"c": 0.5}}})
    other = RunConfig.from_dict({**base, "aggregator_options": {"base": "cagrad", "base_options": {"c": 0.2}}})
    assert implicit.content_hash() == explicit.content_hash() != other.content_hash()
