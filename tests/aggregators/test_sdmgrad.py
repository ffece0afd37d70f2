"""SDMGrad (Xiao et al. 2023): direction-oriented task weights from two independent batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _multi_batch import MultiBatch, batches
from _properties import StrictOptions, random_jacobian

from mtlcore.aggregators import get


class TestSDMGrad(MultiBatch, StrictOptions):
    name = "sdmgrad"
    configurations = [{}, {"lamda": 0.0, "lr": 1.0, "momentum": 0.0, "n_iter": 5}]
    bad_options = [({"lamda": -0.1}, "sdmgrad: option lamda must be a number >= 0.0, got -0.1"),
                   ({"momentum": 1.5}, "sdmgrad: option momentum must be a number >= 0.0 <= 1.0, got 1.5"),
                   ({"n_iter": 0}, "sdmgrad: option n_iter must be an int >= 1, got 0")]


def projection(v):
    """The authors' euclidean_proj_simplex (Duchi et al.)."""
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > (cssv - 1))[0][-1]
    return np.maximum(v - (cssv[rho] - 1) / (rho + 1.0), 0.0)


def libmtl_loop(steps, lamda, lr, momentum, n_iter):
    """LibMTL's SDMGrad.backward in numpy (its torch SGD with momentum written out, a fresh buffer each step)."""
    K = len(steps[0][0])
    w, out = np.full(K, 1.0 / K), []
    for J_zeta, J_xi, J_xi2 in steps:
        GG = J_xi @ J_xi2.T
        scale = np.mean(np.sqrt(np.maximum(np.diag(GG), 0.0)))
        GG = GG / (scale**2 + 1e-8)
        Gg = GG.mean(axis=1)
        buffer = None
        for _ in range(n_iter):
            grad = GG @ w + lamda * Gg
            buffer = grad if buffer is None else momentum * buffer + grad
            w = projection(w - lr * buffer)
        out.append((w + lamda / K) / (1 + lamda))
    return out


@pytest.mark.parametrize("options", [{"lamda": 0.3, "lr": 10.0, "momentum": 0.5, "n_iter": 20},
                                     {"lamda": 0.6, "lr": 5.0, "momentum": 0.0, "n_iter": 7}])
def test_against_libmtls_loop(options):
    steps = [[J.double() for J in batches(s, num_tasks=4)] for s in range(5)]
    agg = get("sdmgrad", **options)
    for jacobians, weights in zip(steps, libmtl_loop([[J.numpy() for J in js] for js in steps], **options)):
        d = agg.aggregate_batches(jacobians)
        np.testing.assert_allclose(agg.weights.numpy(), weights, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(d.numpy(), jacobians[0].T.numpy() @ weights, rtol=1e-10, atol=1e-12)


def test_without_preference_it_converges_to_mgda():
    """λ = 0 and one batch's Gramian for A: projected gradient descent on wᵀAw over the simplex, whose minimiser is
    MGDA's min-norm weights."""
    J = random_jacobian(4, 12, None, seed=3).double()
    agg = get("sdmgrad", lamda=0.0, lr=0.2, momentum=0.5, n_iter=3000)
    agg.aggregate_batches([J, J, J])
    mgda = get("mgda")
    mgda(J)
    torch.testing.assert_close(agg.weights, mgda.weights, rtol=0, atol=1e-6)


def test_a_large_preference_weight_gives_the_mean():
    agg = get("sdmgrad", lamda=1e6)
    agg.aggregate_batches(batches(0))
    torch.testing.assert_close(agg.weights, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_agrees_with_torchjd():
    tjd = pytest.importorskip("torchjd.aggregation")
    ours, theirs = get("sdmgrad"), tjd.SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    for step in range(6):
        jacobians = [J.double() for J in batches(step, num_tasks=5)]
        ours.aggregate_batches(jacobians)
        torch.testing.assert_close(ours.weights, theirs(jacobians[1] @ jacobians[2].T), rtol=1e-12, atol=1e-14)
