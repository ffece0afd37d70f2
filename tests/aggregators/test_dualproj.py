"""DualProj (TorchJD): the mean gradient projected onto the dual cone {x : Jx ≥ 0}."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import (
    CASES, J_REFERENCE, Deterministic, DivergenceDetection, ExpectedStructure, Homogeneous, NonConflicting,
    PermutationInvariant, ResumesBitForBit, StrictOptions, Weighted, jacobians, make,
)
from test_upgrad import assert_dual_cone_kkt

from mtlcore.aggregators import get
from mtlcore.aggregators.upgrad import regularized_gramian


class TestDualProj(ExpectedStructure, Weighted, NonConflicting, PermutationInvariant, Homogeneous, Deterministic,
                   ResumesBitForBit, StrictOptions, DivergenceDetection):
    """Not linear under scaling: the mean it projects weighs the scaled gradients."""

    name = "dualproj"
    configurations = [{}, {"reg_eps": 0.0}]
    bad_options = [({"reg_eps": "small"}, "dualproj: option reg_eps must be a number >= 0.0")]

    def regularisation(self, options):
        return options.get("reg_eps", 1e-4)


def test_known_output():
    """TorchJD's documented example."""
    torch.testing.assert_close(make("dualproj")(J_REFERENCE), torch.tensor([0.5563, 1.1109, 1.1109]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [{}, {"reg_eps": 0.0}])
@pytest.mark.parametrize("J", jacobians(), ids=[f"K{k}-P{p}-r{r or 'full'}" for k, p, r in CASES])
def test_weights_meet_the_projections_kkt_conditions(J, options):
    K = J.shape[0]
    agg = make("dualproj", K, **options)
    agg(J.double())
    G = regularized_gramian(J.double() @ J.double().T, options.get("reg_eps", 1e-4))
    assert_dual_cone_kkt(agg.weights, torch.full((K,), 1.0 / K, dtype=torch.float64), G)


def test_stays_non_conflicting_for_gradients_of_very_different_norms():
    for seed in range(12):
        rng = np.random.default_rng(seed)
        K = (3, 5, 10)[seed % 3]
        J = rng.standard_normal((K, 7 if K < 7 else 20)) * np.where(np.arange(K) % 2 == 0, 1e-3, 1e3)[:, None]
        d = get("dualproj", reg_eps=0.0)(torch.from_numpy(J)).numpy()
        cosines = J @ d / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
        assert cosines.min() > -1e-10, (seed, cosines.min())
