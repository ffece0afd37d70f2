"""DB-MTL (Lin et al. 2023): log-transformed losses, then gradient-magnitude balancing of an EMA of their gradients."""
from __future__ import annotations

import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, PermutationInvariant, ResumesBitForBit, StrictOptions, make,
)

from mtlcore.aggregators import NonFiniteGradientError, get


class TestDBMTL(ExpectedStructure, PermutationInvariant, Deterministic, ResumesBitForBit, StrictOptions,
                DivergenceDetection):
    """No weights with d = Jᵀw (the EMA mixes earlier steps' gradients): `weights` is NaN."""

    name = "dbmtl"
    configurations = [{}, {"beta": 0.8, "beta_sigma": 0.5}]
    bad_options = [({"beta": 1.5}, "dbmtl: option beta must be a number >= 0.0 <= 1.0"),
                   ({"eps": -1.0}, "dbmtl: option eps must be a number >= 0.0")]


def test_follows_its_definition_over_several_steps():
    """LibMTL's DB-MTL, written out in float64: ĝ_k ← ∇log(L_k + ε) + β/t^σ (ĝ_k − ∇log(L_k + ε)) from ĝ_k = 0, then
    d = Σ_k (max_j ‖ĝ_j‖ / ‖ĝ_k‖) ĝ_k."""
    g = torch.Generator().manual_seed(4)
    agg = get("dbmtl", beta=0.8, beta_sigma=0.5)
    buffer = torch.zeros(3, 40, dtype=torch.float64)
    for t in range(1, 6):
        J, losses = torch.randn(3, 40, generator=g) * 10.0 ** (t - 3), torch.rand(3, generator=g) + 0.2
        log_grads = J.double() / (losses.double() + 1e-8)[:, None]
        buffer = log_grads + 0.8 / t**0.5 * (buffer - log_grads)
        norms = buffer.norm(dim=1)
        expected = ((norms.max() / norms)[:, None] * buffer).sum(0)
        torch.testing.assert_close(agg(J, losses).double(), expected, rtol=1e-5, atol=1e-7 * expected.abs().max())
    assert agg.weights.isnan().all()


def test_needs_the_losses_and_weighs_the_heads_by_their_log_gradient():
    J = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    agg = get("dbmtl")
    assert agg.needs_losses
    with pytest.raises(ValueError, match="dbmtl: .* the losses are needed"):
        agg(J)
    torch.testing.assert_close(agg.head_weights(torch.tensor([0.5, 2.0])), 1 / (torch.tensor([0.5, 2.0]) + 1e-8))


def test_stops_on_infinite_log_gradients_and_survives_inference_mode():
    J, losses = torch.randn(2, 30, generator=torch.Generator().manual_seed(2)), torch.tensor([0.5, 1.5])
    agg = get("dbmtl")
    with torch.inference_mode():
        agg(J, losses)
    agg(J, losses)  # the buffer made under inference_mode is updated outside it
    with pytest.raises(NonFiniteGradientError, match="dbmtl: the log-loss gradients"):
        get("dbmtl", eps=0.0)(J, torch.tensor([0.0, 1.0]))  # ∇log L at L = 0


def test_state_follows_the_jacobian_dtype():
    agg = make("dbmtl")
    J = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    agg(J, torch.tensor([0.5, 1.5]))
    d = agg(J.double(), torch.tensor([0.5, 1.5]))
    assert d.dtype == torch.float64 and agg.buffer.dtype == torch.float64
