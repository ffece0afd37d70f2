"""Gradient coherence: trace of the gradient covariance by the small-batch/large-batch estimator.

Paper A, Eq. 4 and Appendix B.3 (after McCandlish et al. 2018). Draw L = n·B examples without
replacement from the N available, split them into n small batches of size B and take
G_B = mean_i ‖∇L_{B_i}‖² and G_L = ‖(1/n) Σ_i ∇L_{B_i}‖². With the finite-population correction
A_Z = (N − Z)/(N − 1), E[G_Z] = ‖∇L‖² + (A_Z/Z) tr Σ for a batch of Z examples drawn without
replacement, where Σ = (1/N) Σ_j (g_j − ḡ)(g_j − ḡ)ᵀ is the per-example gradient covariance over
the N examples. Solving the two equations gives unbiased estimates of tr Σ and ‖∇L‖²; with L = N,
A_L = 0 and G_L is the exact full gradient norm; with L = N and B = 1 both are exact.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtlcore.metrics.common import check_examples, task_named_parameters
from mtlcore.metrics.per_example import per_example_gradient_chunks
from mtlcore.settings.base import Loss, take


@dataclass(frozen=True)
class GradientCoherence:
    trace_covariance: float  # tr Σ, the per-example gradient covariance trace
    grad_norm_sq: float  # ‖∇L‖², the squared norm of the full-data gradient
    small_batch_norm_sq: float  # G_B
    large_batch_norm_sq: float  # G_L


def finite_population_correction(batch_size: int, population_size: int) -> float:
    """A_Z = (N − Z)/(N − 1): the variance factor of a mean over Z of N items drawn without replacement."""
    if not 1 <= batch_size <= population_size:
        raise ValueError(f"batch size {batch_size} must lie in [1, {population_size}] (the number of examples)")
    return 0.0 if population_size == 1 else (population_size - batch_size) / (population_size - 1)


def coherence_estimate(
    small_batch_norm_sq: float, large_batch_norm_sq: float, small_batch: int, large_batch: int, population_size: int
) -> tuple[float, float]:
    """(tr Σ, ‖∇L‖²) from G_B and G_L, Eq. 4 of paper A with the finite-population correction."""
    if large_batch <= small_batch:
        raise ValueError(f"large_batch ({large_batch}) must exceed small_batch ({small_batch})")
    a_small = finite_population_correction(small_batch, population_size)
    a_large = finite_population_correction(large_batch, population_size)
    trace = (small_batch_norm_sq - large_batch_norm_sq) / (a_small / small_batch - a_large / large_batch)
    if a_large == 0.0:  # L = N: the large batch gradient is the full gradient.
        return trace, large_batch_norm_sq
    weight_large, weight_small = large_batch / a_large, small_batch / a_small
    norm_sq = (weight_large * large_batch_norm_sq - weight_small * small_batch_norm_sq) / (weight_large - weight_small)
    return trace, norm_sq


def _check_sizes(small_batch: int, large_batch: int, population_size: int) -> int:
    if small_batch < 1 or large_batch % small_batch != 0:
        raise ValueError(
            f"large_batch ({large_batch}) must be a multiple of small_batch ({small_batch}), which must be ≥ 1"
        )
    if large_batch > population_size:
        raise ValueError(
            f"large_batch ({large_batch}) exceeds the {population_size} examples given; pass more examples "
            f"or a large_batch ≤ {population_size}"
        )
    return large_batch // small_batch


def small_batch_gradients(model: nn.Module, task: str, x, y, small_batch: int, **gradient_options) -> torch.Tensor:
    """Mean gradient of each consecutive batch of `small_batch` examples: (len(x)/small_batch) × P."""
    chunk_size = max(1, gradient_options.pop("chunk_size", 256) // small_batch) * small_batch
    chunks = per_example_gradient_chunks(model, task, x, y, chunk_size=chunk_size, **gradient_options)
    return torch.cat([chunk.reshape(-1, small_batch, chunk.shape[1]).mean(dim=1) for chunk in chunks])


def _summarise(batch_gradients: torch.Tensor, small_batch: int, large_batch: int, population_size: int):
    small_norm_sq = batch_gradients.pow(2).sum(dim=1).mean().item()
    large_norm_sq = batch_gradients.mean(dim=0).pow(2).sum().item()
    trace, norm_sq = coherence_estimate(small_norm_sq, large_norm_sq, small_batch, large_batch, population_size)
    return GradientCoherence(trace, norm_sq, small_norm_sq, large_norm_sq)


def gradient_coherence(
    model: nn.Module,
    task: str,
    x,
    y,
    *,
    loss: Loss,
    small_batch: int = 16,
    large_batch: int = 1024,
    generator: torch.Generator | None = None,
    **gradient_options,
) -> GradientCoherence:
    """Estimate tr Σ and ‖∇L‖² of one task over the N = len(x) examples given (eval mode).

    Gradients are over the parameters the task's loss depends on (encoder + the task's head).
    `gradient_options` go to `per_example_gradient_chunks` (chunk_size, method, device).
    """
    population = check_examples(x, y)
    _check_sizes(small_batch, large_batch, population)
    chosen = torch.randperm(population, generator=generator)[:large_batch]
    batch_gradients = small_batch_gradients(
        model, task, take(x, chosen), take(y, chosen), small_batch, loss=loss, **gradient_options
    )
    return _summarise(batch_gradients, small_batch, large_batch, population)


def multitask_gradient_coherence(
    model: nn.Module,
    tasks_data: Mapping[str, tuple],
    tasks: Sequence[str] | None = None,
    *,
    losses: Mapping[str, Loss],
    small_batch: int = 16,
    large_batch: int = 1024,
    reduction: str = "sum",
    single_input: bool = False,
    generator: torch.Generator | None = None,
    **gradient_options,
) -> GradientCoherence:
    """The same estimate for the uniform multi-task gradient (UMTG, paper A, Eq. 2).

    One training step's multi-task gradient is the gradient of (1/C) Σ_k L_k^{B_k} over all parameters
    (encoder + every head of `tasks`), C = 1 (`reduction="sum"`) or K ("mean"). Multi-input settings
    draw each task's batch B_k independently from its own N examples, so the covariance of this step
    gradient is (A_B/B)·(1/C²) Σ_k Σ_k: the returned trace is (1/C²) Σ_k tr Σ_k, with Σ_k the
    per-example covariance of task k. `single_input=True` uses the same examples for every task (one
    batch carries every task's label); then tr Σ is that of the per-example multi-task
    gradient (1/C) Σ_k g_k(x_j), cross-task covariances included. Every task needs the same number N of
    examples so that one finite-population correction applies.
    """
    tasks = sorted(tasks_data) if tasks is None else list(tasks)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: ['sum', 'mean']")
    missing = [task for task in tasks if task not in tasks_data]
    if missing or not tasks:
        raise ValueError(f"tasks {missing or tasks} have no data in tasks_data (keys {list(tasks_data)})")
    sizes = {task: check_examples(*tasks_data[task]) for task in tasks}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"tasks have different numbers of examples {sizes}; truncate every task to the same N")
    population = sizes[tasks[0]]
    _check_sizes(small_batch, large_batch, population)

    scale = 1.0 if reduction == "sum" else 1.0 / len(tasks)
    shared_names = set(task_named_parameters(model, tasks[0], "shared"))
    shared_sum, heads = 0.0, []
    # Draws in sorted task order, so that the result does not depend on the order of tasks_data.
    shared_draw = torch.randperm(population, generator=generator)[:large_batch] if single_input else None
    for task in sorted(tasks):
        chosen = shared_draw if single_input else torch.randperm(population, generator=generator)[:large_batch]
        x, y = tasks_data[task]
        gradients = small_batch_gradients(model, task, take(x, chosen), take(y, chosen), small_batch, loss=losses[task],
                                          **gradient_options)
        is_shared = torch.cat(
            [
                torch.full((p.numel(),), name in shared_names, dtype=torch.bool)
                for name, p in task_named_parameters(model, task).items()
            ]
        ).to(gradients.device)
        shared_sum = shared_sum + gradients[:, is_shared]
        heads.append(gradients[:, ~is_shared])
    step_gradients = scale * torch.cat([shared_sum, *heads], dim=1)
    return _summarise(step_gradients, small_batch, large_batch, population)
