"""Shared checks of the methods that take three independent batches' Jacobians a step (modo, sdmgrad)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
from _properties import Method, random_jacobian

from mtlcore.aggregators import NonFiniteGradientError


def batches(step: int, num_tasks: int = 3, dim: int = 10) -> list[torch.Tensor]:
    """Three Jacobians of one step: a common part (the expected gradients) plus independent noise per batch."""
    mean = random_jacobian(num_tasks, dim, None, seed=1000 + step)
    return [mean + 0.5 * random_jacobian(num_tasks, dim, None, seed=2000 + 3 * step + b) for b in range(3)]


class MultiBatch(Method):
    """d = J_ζᵀw with the reported weights; one batch alone or a wrong count is refused; NaN/inf in any batch's J or
    losses raise NonFiniteGradientError; two instances built alike agree bit for bit, and one that loads the other's
    state mid-run continues exactly as it."""

    bad_values: ClassVar[list[tuple[dict[str, Any], str]]] = []

    def test_update_is_the_weighted_sum_of_the_step_batchs_gradients(self, options):
        agg = self.make(options, 3)
        for step in range(4):
            jacobians = [J.double() for J in batches(step)]
            d = agg.aggregate_batches(jacobians)
            torch.testing.assert_close(d, agg.weights @ jacobians[0], rtol=1e-12, atol=1e-12)
            assert agg.weights.dtype == torch.float64 and torch.isfinite(agg.weights).all()

    def test_one_batch_or_a_wrong_count_is_refused(self, options):
        agg = self.make(options, 3)
        with pytest.raises(ValueError, match=rf"{self.name}: needs 3 independent batches per step"):
            agg(batches(0)[0])
        with pytest.raises(ValueError, match=rf"{self.name}: needs 3 Jacobians .* got 2"):
            agg.aggregate_batches(batches(0)[:2])
        with pytest.raises(ValueError, match="differ in shape"):
            agg.aggregate_batches([*batches(0)[:2], torch.ones(3, 4)])

    @pytest.mark.parametrize("where", [0, 1, 2])
    def test_non_finite_inputs_raise(self, options, where):
        for bad in (math.nan, math.inf):
            jacobians = batches(0)
            jacobians[where][1, 3] = bad
            with pytest.raises(NonFiniteGradientError, match="the run has diverged"):
                self.make(options, 3).aggregate_batches(jacobians)
        losses = [torch.ones(3) for _ in range(3)]
        losses[where][2] = math.nan
        with pytest.raises(NonFiniteGradientError, match="the losses contain NaN or inf"):
            self.make(options, 3).aggregate_batches(batches(0), losses)

    def test_deterministic_and_resumes_bit_for_bit(self, options):
        first, second = self.make(options, 3), self.make(options, 3)
        for step in range(3):
            assert torch.equal(first.aggregate_batches(batches(step)), second.aggregate_batches(batches(step)))
        resumed = self.make(options, 3)
        resumed.reset(3)
        resumed.load_state_dict(first.state_dict())
        for step in range(3, 6):
            assert torch.equal(resumed.aggregate_batches(batches(step)), first.aggregate_batches(batches(step)))
            assert torch.equal(resumed.weights, first.weights)
