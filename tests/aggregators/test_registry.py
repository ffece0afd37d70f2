"""What every aggregator shares: the registry, the interface the trainer calls, validation and finiteness checks."""
from __future__ import annotations

import math

import pytest
import torch
from _properties import GRADIENT_METHODS, J_REFERENCE, LOSS_METHODS, make, random_jacobian

from mtlcore.aggregators import (
    GradientAggregator, LossAggregator, NonFiniteGradientError, WeightedAggregator, available, get,
)
from mtlcore.aggregators.base import check_finite
from mtlcore.aggregators.gramian import gramian


def test_available_and_kinds():
    assert available() == sorted(available())
    assert len(available()) == 33
    for name in available():
        agg = make(name)
        assert agg.kind in ("gradient", "loss") and agg.name == name
        assert isinstance(agg, GradientAggregator if agg.kind == "gradient" else LossAggregator)
        assert isinstance(agg.options, dict)
    assert set(LOSS_METHODS) == {"gradnorm", "uncertainty", "dwa", "rlw", "imtl_l", "famo", "scale_invariant",
                                 "gls", "stch", "pbi"}
    on_jacobians = {name for name in GRADIENT_METHODS if not isinstance(make(name), WeightedAggregator)}
    assert on_jacobians == {"graddrop", "dbmtl", "trimmed_mean", "excess_mtl", "moco", "modo", "sdmgrad"}
    assert issubclass(NonFiniteGradientError, FloatingPointError)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown aggregator 'mgdaa'.*valid names: aligned_mtl, cagrad"):
        get("mgdaa")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"cagrad: unknown option\(s\) \['alpha'\].*c=0.5, rescale=1"):
        get("cagrad", alpha=0.5)
    with pytest.raises(ValueError, match="unknown option.*generator"):
        get("mgda", generator=torch.Generator())


@pytest.mark.parametrize("name", available())
def test_flags_the_trainer_reads(name):
    agg = make(name, 3)  # krum and trimmed_mean need three tasks
    if agg.kind == "gradient":
        assert agg.jacobian_of == ("representation" if name == "mgda_ub" else "shared")
    assert agg.randomised == (name in ("pcgrad", "gradvac", "graddrop", "rlw"))
    assert agg.draws_on_host == (name in ("pcgrad", "gradvac", "rlw"))
    # draws used on the host come from a CPU generator in a CUDA run; GradDrop's mask J on its device
    assert agg.generator_device("cuda:1") == torch.device("cpu" if agg.draws_on_host else "cuda:1")
    assert agg.needs_losses_after == (name == "famo") and agg.needs_last_shared == (name == "gradnorm")
    agg.reset(3)
    assert len(agg.parameters()) == (1 if name in ("uncertainty", "imtl_l") else 0)


def test_weights_before_and_after_a_step():
    agg = get("mgda")
    assert agg.weights.numel() == 0
    agg.reset(2)
    assert agg.weights.dtype == torch.float64 and agg.weights.isnan().all()
    agg(J_REFERENCE)
    torch.testing.assert_close(agg.head_weights(torch.ones(2)), torch.tensor([0.6, 0.4]))


def test_mismatched_task_count_and_missing_losses():
    agg = make("mgda")
    agg(J_REFERENCE)
    with pytest.raises(ValueError, match="got 3 tasks but was reset for 2; call reset"):
        agg(torch.ones(3, 3))
    with pytest.raises(ValueError, match="call reset"):
        agg.weighting(torch.eye(3))
    with pytest.raises(ValueError, match="mgda: J must be a float matrix"):
        agg(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mgda: G must be a square matrix"):
        agg.weighting(torch.ones(2, 3))
    with pytest.raises(ValueError, match="losses must be a vector of 2 task losses"):
        make("mgda", normalization="loss")(J_REFERENCE, torch.ones(3))
    with pytest.raises(ValueError, match="with options .* the losses are needed"):
        make("mgda", normalization="loss")(J_REFERENCE)


def test_weighting_of_a_gramian_formed_without_the_jacobian():
    """TorchJD's Weighting: the weights depend on J only through G = J Jᵀ, so any J with the same Gramian (here J
    rotated by an orthogonal Q) and the Gramian itself give the same weights."""
    J = random_jacobian(4, 6, None, seed=5).double()
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    for name in ("mgda", "upgrad", "dualproj", "imtl_g", "cagrad", "nashmtl", "aligned_mtl", "pcgrad", "krum", "config",
                 "fairgrad", "cr_mogm"):
        from_gramian = make(name, 4).weighting(gramian(J))
        torch.testing.assert_close(make(name, 4).weights_from(J @ Q), from_gramian, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(make(name, 4).weighting(J @ J.T), from_gramian, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_finiteness_check_flags_nan_and_inf_but_not_large_finite_values(dtype):
    big = torch.full((1000,), 6e4, dtype=dtype)  # fp16's own sum of these overflows; they are finite
    check_finite("t", big, "x")
    for bad in (math.nan, math.inf, -math.inf):
        x = big.clone()
        x[17] = bad
        with pytest.raises(NonFiniteGradientError):
            check_finite("t", x, "x")
    both = big.clone()
    both[0], both[1] = math.inf, -math.inf  # inf + (-inf) is NaN: still caught
    with pytest.raises(NonFiniteGradientError):
        check_finite("t", both, "x")


@pytest.mark.parametrize("name", [name for name in GRADIENT_METHODS if name not in ("modo", "sdmgrad")])
def test_an_update_in_the_jacobians_dtype_that_keeps_its_graph(name):  # modo and sdmgrad: in their own tests
    """d comes back in J's dtype, and records a gradient where J does (d = Jᵀw, w a constant): the weighted
    methods' products stay differentiable in J."""
    J = random_jacobian(3, 10, None, seed=2).double().requires_grad_(True)
    d = make(name, 3)(J, torch.tensor([0.5, 1.0, 2.0]))
    assert d.dtype == torch.float64
    if isinstance(make(name), WeightedAggregator):
        (gradient,) = torch.autograd.grad(d.sum(), J)
        agg = make(name, 3)
        agg(J.detach(), torch.tensor([0.5, 1.0, 2.0]))
        torch.testing.assert_close(gradient, agg.weights[:, None].expand(3, 10))
