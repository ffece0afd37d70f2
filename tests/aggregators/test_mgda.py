"""MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the (normalised) task gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    CASES, J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, NonConflicting,
    PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, jacobians, make, random_jacobian,
    two_task_jacobians,
)

from mtlcore.aggregators import get
from mtlcore.aggregators._qp import min_norm_in_hull

class TestMGDA(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Homogeneous, Deterministic,
               ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "mgda"
    configurations = [{}, {"normalization": "loss"}]
    bad_options = [({"normalization": "l1"}, "mgda: normalization must be one of"),
                   ({"apply_to": "both"}, "mgda: apply_to must be 'normalized' or 'raw'")]


class TestMGDAWithGradientNorms(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Deterministic,
                                ResumesBitForBit, StrictOptions, DivergenceDetection):
    """Normalised by ‖g_k‖ (and the loss): d does not depend on the gradients' scales (below), so not Homogeneous."""

    name = "mgda"
    configurations = [{"normalization": "l2"}, {"normalization": "loss+"}]


def test_known_output_and_weights():
    """The known output on the reference J (TorchJD's documentation)."""
    agg = make("mgda")
    torch.testing.assert_close(agg(J_REFERENCE), torch.tensor([0.0, 1.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(agg.weights, torch.tensor([0.6, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("normalization, reads", [("none", False), ("l2", False), ("loss", True), ("loss+", True)])
def test_reads_the_losses_only_to_normalise_by_them(normalization, reads):
    assert get("mgda", normalization=normalization).needs_losses == reads


@pytest.mark.parametrize("J", jacobians(), ids=[f"K{k}-P{p}-r{r or 'full'}" for k, p, r in CASES])
def test_kkt(J):
    """α on the simplex with (Gα)_i ≥ αᵀGα for every i: the min-norm point of the convex hull."""
    agg = make("mgda")
    agg(J)
    alpha = agg.weights.numpy()
    G = (J.double() @ J.double().T).numpy()
    tol = 1e-7 * np.trace(G)
    assert (alpha >= -1e-12).all()
    assert alpha.sum() == pytest.approx(1.0, abs=1e-9)
    assert (G @ alpha >= alpha @ G @ alpha - tol).all()


def test_kkt_to_relative_precision_when_norms_differ_by_1e6():
    """At α* every (Gα*)_i ≥ α*ᵀGα* with equality where α*_i > 0 (the min-norm point's optimality). Measured
    relative to α*ᵀGα*, which the smallest gradients set: the NNLS in rescaled variables meets it to ~1e-9,
    where the one on u = α·t had left 1e-4 (an absolute test, 1e-7·trace G, could not see it)."""
    worst = 0.0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        K = int(rng.integers(2, 11))
        J = rng.standard_normal((K, int(rng.choice([K + 3, 20, 50])))) * (10.0 ** rng.uniform(-3, 3, size=K))[:, None]
        agg = make("mgda")
        agg(torch.from_numpy(J))
        alpha = agg.weights.numpy()
        G = J @ J.T
        q, g = alpha @ G @ alpha, G @ alpha
        assert (alpha >= 0).all() and alpha.sum() == pytest.approx(1.0, abs=1e-12)
        worst = max(worst, -(g - q).min() / q, np.abs(g - q)[alpha > 0].max() / q)
    assert worst < 1e-7, worst


@pytest.mark.parametrize("J", two_task_jacobians())
def test_two_task_closed_form_matches_a_grid_search(J):
    G = J.double() @ J.double().T
    closed = min_norm_in_hull(G)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    values = grid**2 * G[0, 0] + 2 * grid * (1 - grid) * G[0, 1] + (1 - grid) ** 2 * G[1, 1]
    assert closed @ G @ closed <= values.min() + 1e-9 * G.trace()


def test_l2_normalisation_ignores_the_gradients_scales():
    J = random_jacobian(3, 10, None, seed=8)
    d = make("mgda", 3, normalization="l2")(J)
    row_scales = torch.tensor([[1e-2], [5.0], [1e3]])
    torch.testing.assert_close(make("mgda", 3, normalization="l2")(row_scales * J), d, rtol=1e-4, atol=1e-6)


def test_apply_to_raw_uses_alpha_on_the_raw_gradients():
    J = random_jacobian(3, 10, None, seed=9)
    losses = torch.tensor([0.5, 1.0, 2.0])
    normalized = make("mgda", normalization="loss")
    raw = make("mgda", normalization="loss", apply_to="raw")
    normalized(J, losses)
    raw(J, losses)
    torch.testing.assert_close(normalized.weights * losses.double(), raw.weights)
