"""G = J Jᵀ in float64 (mtlcore/aggregators/gramian.py): exact products, float64 sums, bounded float64 blocks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlcore.aggregators import NonFiniteGradientError, get
from mtlcore.aggregators import gramian as gramian_module
from mtlcore.aggregators.gramian import gramian


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 18])
def test_blocks_equal_the_float64_product(monkeypatch, block):
    """Block-wise float64 accumulation gives J Jᵀ of the float64 J, whatever the block size."""
    monkeypatch.setattr(gramian_module, "BLOCK_CPU", block)
    J = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    G = gramian(J)
    assert G.dtype == torch.float64 and G.shape == (4, 4) and not G.requires_grad
    torch.testing.assert_close(G, J.double() @ J.double().T, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [8, 1 << 18])
def test_every_float_dtype(monkeypatch, dtype, block):
    monkeypatch.setattr(gramian_module, "BLOCK_CPU", block)
    J = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(gramian(J), J.double() @ J.double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 13, 23])
@pytest.mark.parametrize("P", [0, 1, 5, 2051, 70_001])
def test_exact_on_integer_matrices(K, P):
    """Small integers: every product and partial sum is exact in float64, so G must equal the integer Gramian entry
    for entry, over one block or several."""
    ints = torch.randint(-100, 101, (K, P), generator=torch.Generator().manual_seed(K * 1000 + P))
    G = gramian(ints.float())
    assert G.dtype == torch.float64 and G.shape == (K, K)
    assert torch.equal(G, (ints @ ints.T).double())


def test_float32_entries_over_20_orders_of_magnitude_and_strided_rows():
    """The float64 products of float32 entries are exact and only the sums round (~1e-16 relative each, far below
    float32's 6e-8); rows that are not adjacent in memory (a column slice) and a column-major J."""
    rng = np.random.default_rng(3)
    J = (rng.standard_normal((6, 3001)) * 10.0 ** rng.uniform(-10, 10, (6, 3001))).astype(np.float32)
    rows = J.astype(np.float64)
    exact = torch.tensor([[math.fsum(a * b) for b in rows] for a in rows], dtype=torch.float64)
    wide = torch.zeros(6, 3100)
    wide[:, :3001] = torch.from_numpy(J)
    for given in (torch.from_numpy(J), wide[:, :3001], torch.from_numpy(J).T.contiguous().T):
        torch.testing.assert_close(gramian(given), exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_show_on_the_diagonal(monkeypatch, bad):
    """Callers check G's K×K entries instead of scanning J's K×P: a bad entry must reach G (its row's diagonal)."""
    monkeypatch.setattr(gramian_module, "BLOCK_CPU", 1000)  # the bad entry in a middle block
    J = torch.randn(9, 5000, generator=torch.Generator().manual_seed(5))
    J[6, 4321] = bad
    G = gramian(J)
    assert not torch.isfinite(G[6, 6])
    others = [k for k in range(9) if k != 6]
    assert torch.isfinite(G[others][:, others]).all()
    with pytest.raises(NonFiniteGradientError, match="upgrad: the task gradients J contain NaN or inf"):
        get("upgrad")(J)


def test_degenerate_shapes_and_a_jacobian_that_records_a_gradient():
    assert gramian(torch.zeros(0, 5)).shape == (0, 0)
    assert torch.equal(gramian(torch.zeros(3, 0)), torch.zeros(3, 3, dtype=torch.float64))
    J = torch.randn(3, 7, requires_grad=True)
    G = gramian(J)
    assert not G.requires_grad
    torch.testing.assert_close(G, (J.double() @ J.double().T).detach())


def test_overflows_neither_float32_nor_float16_products():
    J = torch.full((2, 10), 3e30)  # squares ~1e61: inf in float32
    torch.testing.assert_close(gramian(J), torch.full((2, 2), 10 * 9e60, dtype=torch.float64))
    torch.testing.assert_close(gramian(torch.full((2, 10), 6e4, dtype=torch.float16)),
                               torch.full((2, 2), 10 * 6e4**2, dtype=torch.float64), rtol=1e-3, atol=0)
