"""Trace of the Fisher information matrix (paper A, Eq. 5).

tr F = E_x E_{ŷ∼p_θ(·|x)} ‖∇_w −log p_θ(ŷ|x)‖², w = the parameters the task's loss depends on. The task's
`Loss` gives p_θ: `loss.sample(outputs)` draws ŷ (a softmax for a categorical likelihood, a Gaussian around the output for
a squared error; `loss.sample_like(outputs, y)` when the true targets are given, so that pixels they leave out stay out), and `loss.fisher_scale` turns squared gradients of the loss into those of −log p_θ. With
`empirical=True` the true targets replace ŷ (the empirical Fisher).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from mtlcore.metrics.common import batched_outputs, check_examples
from mtlcore.metrics.per_example import per_example_squared_norms
from mtlcore.settings.base import Loss


def fisher_trace(
    model: nn.Module,
    task: str,
    x,
    y=None,
    *,
    loss: Loss,
    empirical: bool = False,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
    method: str = "auto",
    device: torch.device | str | None = None,
) -> float:
    """tr F averaged over the examples of (x, y); the model ends in its previous mode, parameters untouched.

    empirical: use the true targets `y` (empirical Fisher) instead of targets sampled from the model.
    num_samples: targets sampled per example (the expectation over ŷ is their average).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    gradient_options = dict(loss=loss, chunk_size=chunk_size, method=method, device=device)
    if empirical:
        if y is None:
            raise ValueError("empirical=True needs the true targets y; pass y or use empirical=False")
        check_examples(x, y)
        return loss.fisher_scale * per_example_squared_norms(model, task, x, y, **gradient_options).mean().item()

    outputs = batched_outputs(model, task, x, device=device).repeat_interleave(num_samples, dim=0)
    if y is None:
        sampled = loss.sample(outputs, generator=generator)
    else:  # a likelihood over part of the output (masked pixels) follows the true targets' mask
        sampled = loss.sample_like(outputs, tree_map(lambda t: t.repeat_interleave(num_samples, dim=0), y), generator)
    repeated = tree_map(lambda t: t.repeat_interleave(num_samples, dim=0), x)
    norms = per_example_squared_norms(model, task, repeated, sampled, **gradient_options)
    return loss.fisher_scale * norms.mean().item()
