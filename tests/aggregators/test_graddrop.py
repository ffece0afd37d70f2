"""GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, drawn at random."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    Deterministic, DivergenceDetection, ExpectedStructure, PermutationInvariant, ResumesBitForBit, StrictOptions, make,
    random_jacobian,
)

from mtlcore.aggregators import get


class TestGradDrop(ExpectedStructure, PermutationInvariant, Deterministic, ResumesBitForBit, StrictOptions,
                   DivergenceDetection):
    """Permutation invariant for the same draws: P and d depend on J through column sums. No weights with d = Jᵀw."""

    name = "graddrop"
    configurations = [{}, {"leak": 0.3}]
    bad_options = [({"leak": 1.5}, "graddrop: option leak must be a number >= 0.0 <= 1.0")]


def test_has_no_task_weights():
    agg = make("graddrop", 3)
    agg(random_jacobian(3, 10, None, seed=1))
    assert agg.weights.shape == (3,) and agg.weights.isnan().all()
    torch.testing.assert_close(agg.head_weights(torch.ones(3)), torch.ones(3))


def test_keeps_everything_when_signs_agree():
    J = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) + 0.1
    torch.testing.assert_close(make("graddrop")(J), J.sum(dim=0))
    torch.testing.assert_close(make("graddrop")(-J), -J.sum(dim=0))


def test_keeps_one_sign_per_coordinate():
    J = random_jacobian(3, 200, None, seed=3)
    d = make("graddrop")(J)
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    assert (torch.isclose(d, positive) | torch.isclose(d, negative)).all()


@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("block", [1 << 18, 8])
def test_follows_its_definition_entry_by_entry(monkeypatch, leak, block):
    """Against the paper's definition written out per coordinate and per task in float64, with the same uniform
    draws: P = ½(1 + Σg/Σ|g|), keep gᵢ > 0 where P > U and gᵢ < 0 where P < U, d = Σ (leak + (1 − leak)·keep)·gᵢ.
    block 8: the computation runs over many column blocks."""
    from mtlcore.aggregators import graddrop

    monkeypatch.setattr(graddrop, "GRADDROP_BLOCK", block)
    J = random_jacobian(4, 300, None, seed=8)
    J[:, :10] = 0.0  # columns without any gradient
    d = get("graddrop", leak=leak, generator=torch.Generator().manual_seed(9))(J)
    U = torch.rand(300, generator=torch.Generator().manual_seed(9)).double().numpy()
    G = J.double().numpy()
    decided = 0
    for j in range(300):
        g = G[:, j]
        purity = 0.5 * (1 + (g.sum() / np.abs(g).sum() if np.abs(g).sum() > 0 else 0.0))
        if abs(purity - U[j]) < 1e-5:
            continue  # a float32 rounding of P could decide either way
        keep = ((purity > U[j]) & (g > 0)) | ((purity < U[j]) & (g < 0))
        expected = ((leak + (1 - leak) * keep) * g).sum()
        assert d[j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), j
        decided += 1
    assert decided > 280
