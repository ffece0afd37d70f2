"""GradNorm (Chen et al. 2018): learn task weights that equalise the gradient norms at rates r_i^α."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _properties import Deterministic, DivergenceDetection, ResumesBitForBit, StrictOptions, WeightsAreLossGradients

from mtlcore.aggregators import get


class TestGradNorm(WeightsAreLossGradients, Deterministic, ResumesBitForBit, StrictOptions, DivergenceDetection):
    name = "gradnorm"
    configurations = [{}, {"alpha": 0.5, "lr": 0.1}]
    bad_options = [({"alpha": -1.0}, "gradnorm: option alpha must be a number >= 0.0")]


def test_one_step_by_hand():
    W = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    losses = torch.stack([3.0 * W.sum(), 1.0 * W.sum()])  # ‖∇_W L‖ = 3√2 and √2
    agg = get("gradnorm", alpha=1.5, lr=0.1)
    total = agg.combine(losses, last_shared=[W])
    assert total.item() == pytest.approx(8.0)  # weights 1 at the first step
    # r = 1, target = mean(G) = 2√2: ∂L_grad/∂w = sign(G_i − target)·n_i = [+, −]; Adam moves ±lr
    w = np.array([1.0 - 0.1, 1.0 + 0.1])
    np.testing.assert_allclose(agg.task_weights.detach().numpy(), 2 * w / w.sum(), rtol=1e-5)
    total.backward()
    torch.testing.assert_close(W.grad, torch.tensor([4.0, 4.0]))


def test_needs_the_last_shared_layer():
    agg = get("gradnorm")
    assert agg.needs_last_shared
    with pytest.raises(ValueError, match="last_shared"):
        agg.combine(torch.ones(2))
