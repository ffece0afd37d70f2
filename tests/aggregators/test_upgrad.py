"""UPGrad (Quinton & Rey 2024, TorchJD): the mean of each gᵢ projected onto the dual cone {x : Jx ≥ 0}."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    CASES, J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, LinearUnderScaling,
    NonConflicting, PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, jacobians, make, random_jacobian,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlcore.aggregators import get
from mtlcore.aggregators._qp import project_weights_to_dual_cone
from mtlcore.aggregators.upgrad import regularized_gramian


class TestUPGrad(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Homogeneous, Deterministic,
                 ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "upgrad"
    configurations = [{}, {"reg_eps": 0.0}]
    bad_options = [({"reg_eps": -1e-4}, "upgrad: option reg_eps must be a number >= 0.0")]

    def regularisation(self, options):
        return options.get("reg_eps", 1e-4)


class TestUPGradUnregularised(LinearUnderScaling):
    """Each projection is positively homogeneous and the dual cone does not change with positive row scales; the
    regularisation (reg_eps·I added to G/trace G) breaks this by ~reg_eps."""

    name = "upgrad"
    configurations = [{"reg_eps": 0.0}]


def assert_dual_cone_kkt(v: torch.Tensor, u: torch.Tensor, G: torch.Tensor) -> None:
    """v = argmin_{v ≥ u} vᵀGv (the dual of projecting Jᵀu onto the dual cone): v ≥ u, Gv ≥ 0 (the multipliers) and
    (v − u)·(Gv) = 0 (complementary slackness), to a tolerance relative to G's scale."""
    tol = 1e-9 * G.diagonal().max() * v.abs().max()
    Gv = G @ v
    assert (v >= u - 1e-12).all() and (Gv >= -tol).all()
    assert ((v - u) * Gv).abs().max() <= tol * (v - u).abs().max() + 1e-15


def test_known_output():
    """The known output on the reference J (TorchJD's documentation)."""
    torch.testing.assert_close(make("upgrad")(J_REFERENCE), torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [{}, {"reg_eps": 0.0}])
@pytest.mark.parametrize("J", jacobians(), ids=[f"K{k}-P{p}-r{r or 'full'}" for k, p, r in CASES])
def test_weights_are_the_sum_of_the_projections_kkt_points(J, options):
    """w = Σ_i v_i, each v_i meeting the KKT conditions of the projection of gᵢ/K on the regularised Gramian."""
    K = J.shape[0]
    agg = make("upgrad", K, **options)
    agg(J.double())
    G = regularized_gramian(J.double() @ J.double().T, options.get("reg_eps", 1e-4))
    projections = [project_weights_to_dual_cone(u, G) for u in torch.eye(K, dtype=torch.float64) / K]
    for u, v in zip(torch.eye(K, dtype=torch.float64) / K, projections):
        assert_dual_cone_kkt(v, u, G)
    torch.testing.assert_close(agg.weights, sum(projections), rtol=1e-9, atol=1e-12)


@given(st.integers(min_value=2, max_value=5), st.integers(min_value=1, max_value=12), st.integers(0, 10**6))
@settings(max_examples=40, derandomize=True, deadline=None)
def test_each_projection_lies_in_the_dual_cone(num_tasks, dim, seed):
    J = random_jacobian(num_tasks, dim, None, seed)
    d = make("upgrad", num_tasks, reg_eps=0.0)(J).double()
    J64 = J.double()
    assert (J64 @ d >= -1e-5 * J64.norm(dim=1) * J64.norm() - 1e-9).all()


def test_stays_non_conflicting_for_gradients_of_very_different_norms():
    """Norms 1e-3 and 1e3 (cond(G) ~ 1e12): the factor of G is taken on the unit gradients, so the small
    gradients' directions are resolved and d conflicts with none (an eigh of G itself left ~1e-3 conflict)."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        K = (3, 5, 10)[seed % 3]
        J = rng.standard_normal((K, 7 if K < 7 else 20)) * np.where(np.arange(K) % 2 == 0, 1e-3, 1e3)[:, None]
        d = get("upgrad", reg_eps=0.0)(torch.from_numpy(J)).numpy()
        cosines = J @ d / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
        assert cosines.min() > -1e-10, (seed, cosines.min())
