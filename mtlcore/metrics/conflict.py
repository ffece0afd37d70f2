"""Gradient conflict (paper A, Eq. 6; paper B).

Paper A: cos(g_k, d) on the shared parameters, d the update actually applied (the uniform multi-task
gradient by default, or any aggregator's output), averaged over random training batches.
Paper B: (1/K) Σ_k cos(g_k, ḡ), ḡ the mean task gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mtlcore.metrics.common import check_examples, evaluation_mode, model_device
from mtlcore.settings.base import Loss, take, to_device

# (J (K × P), the batch's K mean task losses) → d (P): the update a run applies (see mtlcore.training.updates)
UpdateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cosines(jacobian: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    # A zero gradient or update has cosine 0 (cosine_similarity's eps), not NaN.
    return F.cosine_similarity(jacobian, direction.unsqueeze(0).expand_as(jacobian), dim=1)


def mean_cosine_to_mean_gradient(jacobian: torch.Tensor) -> float:
    """(1/K) Σ_k cos(g_k, ḡ) for the rows g_k of J (K × P), ḡ their mean."""
    if jacobian.dim() != 2 or len(jacobian) == 0:
        raise ValueError(f"jacobian must be a non-empty K × P matrix, got shape {tuple(jacobian.shape)}")
    return _cosines(jacobian, jacobian.mean(dim=0)).mean().item()


def shared_jacobian(
    model: nn.Module, batches: Mapping[str, tuple], losses: Mapping[str, Loss], with_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """J (K × P): row k is the gradient of task k's mean batch loss w.r.t. the shared parameters; with_losses: also
    those K losses (detached)."""
    shared = model.shared_parameters()
    rows, values = [], []
    for task, (x, y) in batches.items():
        loss = losses[task].mean(model(x, task), y)
        grads = torch.autograd.grad(loss, shared, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, shared)]))
        values.append(loss.detach())
    return (torch.stack(rows), torch.stack(values)) if with_losses else torch.stack(rows)


def gradient_conflict(
    model: nn.Module,
    tasks_data: Mapping[str, tuple],
    update_fn: UpdateFn | None = None,
    *,
    losses: Mapping[str, Loss],
    batch_size: int,
    num_batches: int = 200,
    reduction: str = "sum",
    single_input: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    train_mode: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Task → mean over `num_batches` random batches of cos(g_k, d) on the shared parameters.

    d = update_fn(J, losses) for J the K × P matrix of task gradients (rows in the order of tasks_data, the order
    an aggregator's weights refer to: pass the run's task order) and the batch's K mean task losses, by default
    the uniform update Σ_k g_k (`reduction="sum"`) or its mean ("mean"); cosines do not depend on that
    scale, the option only makes d the exact training update. Each batch draws `batch_size` examples
    per task without replacement; multi-input settings draw every task independently,
    `single_input=True` uses the same indices for every task (one batch carries every task's label).
    Batches are drawn in sorted task order, so the draws do not depend on the order of tasks_data.
    The model is in eval mode unless train_mode=True (dropout as during training); its mode is restored.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: ['sum', 'mean']")
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches ({num_batches}) and batch_size ({batch_size}) must be positive")
    tasks = list(tasks_data)  # J's rows
    if not tasks:
        raise ValueError("tasks_data is empty; pass at least one task's (x, y)")
    draw_order = sorted(tasks)
    sizes = {task: check_examples(*tasks_data[task]) for task in tasks}
    if single_input and len(set(sizes.values())) != 1:
        raise ValueError(f"single_input=True needs the same examples for every task, got sizes {sizes}")
    if update_fn is None:
        update_fn = (lambda j, _: j.sum(dim=0)) if reduction == "sum" else (lambda j, _: j.mean(dim=0))
    device = model_device(model, device)

    totals = torch.zeros(len(tasks))
    with evaluation_mode(model):
        model.train(train_mode)
        for _ in tqdm(range(num_batches), desc="gradient conflict", disable=not progress, leave=False):
            shared_draw = torch.randperm(sizes[draw_order[0]], generator=generator)[:batch_size] if single_input else None
            batches = {}
            for task in draw_order:
                chosen = shared_draw if single_input else torch.randperm(sizes[task], generator=generator)[:batch_size]
                x, y = tasks_data[task]
                batches[task] = (to_device(take(x, chosen), device), to_device(take(y, chosen), device))
            jacobian, task_losses = shared_jacobian(model, {task: batches[task] for task in tasks}, losses, True)
            update = update_fn(jacobian, task_losses)
            totals += _cosines(jacobian, update).detach().cpu()
    return {task: (total / num_batches).item() for task, total in zip(tasks, totals)}
