"""STCH (Lin et al. 2024): smooth Tchebycheff scalarisation of the nadir-normalised log losses."""
from __future__ import annotations

import math

import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestSTCH(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "stch"
    # warmup_epochs=0: the test drivers end an epoch after every step, so the STCH phase is reached at once
    configurations = [{}, {"warmup_epochs": 0, "mu": 0.5}, {"warmup_epochs": 1, "mu": 2.0}]
    bad_options = [({"mu": 0.0}, "stch: option mu must be a number >= 1e-12, got 0.0"),
                   ({"warmup_epochs": 1.5}, "stch: option warmup_epochs must be an int >= 0")]


def libmtl_loss(losses, nadir, mu):
    """LibMTL's STCH loss: the same up to a constant (it drops the max it subtracts), so the same gradient."""
    normalised = torch.log(losses / nadir + 1e-20)
    shifted = normalised - normalised.detach().max()
    return mu * torch.log(torch.exp(shifted / mu).sum()) * len(losses)


def test_phases_by_hand():
    agg = get("stch", mu=0.5, warmup_epochs=1)
    first = torch.tensor([2.0, 0.5])
    total = agg.combine(first)
    assert total.item() == pytest.approx(math.log(2.0) + math.log(0.5), abs=1e-6)  # epoch 0: Σ log L
    torch.testing.assert_close(agg.weights, 1 / first.double())
    assert agg.nadir_count == 0
    agg.end_epoch(first)
    for losses in (torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])):  # epoch 1: Σ log L, averaged into n
        agg.combine(losses)
    agg.end_epoch(first)
    losses = torch.tensor([4.0, 1.0], requires_grad=True)
    total = agg.combine(losses)
    torch.testing.assert_close(agg.nadir, torch.tensor([2.0, 2.0], dtype=torch.float64))
    expected = 2 * 0.5 * math.log(math.exp(math.log(4 / 2) / 0.5) + math.exp(math.log(1 / 2) / 0.5))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    (libmtl,) = torch.autograd.grad(libmtl_loss(losses, torch.tensor([2.0, 2.0]), 0.5), losses)
    (ours,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(ours, libmtl)


def test_tends_to_tchebycheff_as_mu_goes_to_zero():
    """K μ logΣexp(ℓ/μ) − K max ℓ lies in [0, K μ log K]: STCH → K·max_k log(L_k/n_k) as μ → 0, and its gradient
    to that of the largest term alone."""
    losses = torch.tensor([0.7, 2.5, 1.1], dtype=torch.float64, requires_grad=True)
    nadir = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for mu in (1e-1, 1e-2, 1e-3):
        agg = get("stch", mu=mu, warmup_epochs=0)
        agg.combine(nadir)  # epoch 0 is the nadir epoch: n = these losses
        agg.end_epoch(nadir)
        total = agg.combine(losses)
        tchebycheff = 3 * torch.log(losses / nadir).max()
        assert 0 <= (total - tchebycheff).item() <= 3 * mu * math.log(3) + 1e-12
    (gradient,) = torch.autograd.grad(total, losses)
    largest = int(torch.argmax(torch.log(losses / nadir)))  # task 2: log(1.1/0.5)
    torch.testing.assert_close(gradient, torch.nn.functional.one_hot(torch.tensor(largest), 3).double()
                               * 3 / losses.detach(), rtol=1e-6, atol=1e-6)


def test_end_epoch_needs_the_task_count():
    with pytest.raises(ValueError, match="stch: call reset"):
        get("stch").end_epoch(torch.ones(2))
