"""Gradient conflict (REFERENCE §1.3, Eq. 6; §2).

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

from mtlcore.metrics.common import check_examples, evaluation_mode, mean_loss, model_device

# J (K × P) → d (P); a function with the attribute `takes_losses = True` is called as update_fn(J, losses), with the
# batch's K mean task losses (the aggregators that read them: DB-MTL, MGDA with loss normalisation)
UpdateFn = Callable[..., torch.Tensor]


def _cosines(jacobian: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    # A zero gradient or update has cosine 0 (cosine_similarity's eps), not NaN.
    return F.cosine_similarity(jacobian, direction.unsqueeze(0).expand_as(jacobian), dim=1)


def mean_cosine_to_mean_gradient(jacobian: torch.Tensor) -> float:
    """(1/K) Σ_k cos(g_k, ḡ) for the rows g_k of J (K × P), ḡ their mean."""
    if jacobian.dim() != 2 or len(jacobian) == 0:
        raise ValueError(f"jacobian must be a non-empty K × P matrix, got shape {tuple(jacobian.shape)}")
    return _cosines(jacobian, jacobian.mean(dim=0)).mean().item()


def shared_jacobian(
    model: nn.Module, batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]], losses: Mapping[str, str],
    with_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """J (K × P): row k is the gradient of task k's mean batch loss w.r.t. the shared parameters; with_losses: also
    those K losses (detached)."""
    shared = model.shared_parameters()
    rows, values = [], []
    for task, (x, y) in batches.items():
        loss = mean_loss(model(x, task), y, losses[task])
        grads = torch.autograd.grad(loss, shared, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, shared)]))
        values.append(loss.detach())
    return (torch.stack(rows), torch.stack(values)) if with_losses else torch.stack(rows)


def gradient_conflict(
    model: nn.Module,
    tasks_data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    update_fn: UpdateFn | None = None,
    *,
    batch_size: int,
    num_batches: int = 200,
    reduction: str = "sum",
    single_input: bool = False,
    losses: str | Mapping[str, str] = "cross_entropy",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    train_mode: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Task → mean over `num_batches` random batches of cos(g_k, d) on the shared parameters.

    d = update_fn(J) for J the K × P matrix of task gradients (rows in the order of tasks_data, the order
    an aggregator's weights refer to: pass the run's task order), or update_fn(J, losses) where update_fn has
    `takes_losses = True` (losses: the batch's K mean task losses), by default
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
    losses = {task: losses for task in tasks} if isinstance(losses, str) else dict(losses)
    if update_fn is None:
        update_fn = (lambda j: j.sum(dim=0)) if reduction == "sum" else (lambda j: j.mean(dim=0))
    takes_losses = getattr(update_fn, "takes_losses", False)
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
                batches[task] = (x[chosen].to(device), y[chosen].to(device))
            jacobian, task_losses = shared_jacobian(model, {task: batches[task] for task in tasks}, losses, True)
            update = update_fn(jacobian, task_losses) if takes_losses else update_fn(jacobian)
            totals += _cosines(jacobian, update).detach().cpu()
    return {task: (total / num_batches).item() for task, total in zip(tasks, totals)}
