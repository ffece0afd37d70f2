"""The task Jacobian J (one row per task's gradient) and writing an update back into `.grad`.

Typical gradient-level step (what the trainer does)::

    losses = torch.stack([loss_fn[t](model(x, t), y[t]) for t in tasks])
    J = task_jacobian(losses, model.shared_parameters())       # K × P, graph kept
    d = aggregator(J, losses.detach())
    optimizer.zero_grad()
    losses.sum().backward()          # heads get their own task's gradient
    unflatten_into_grads(d, model.shared_parameters())         # shared grads := d
    optimizer.step()
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from mtlcore.aggregators.base import logger


def _flatten_rows(grads: tuple[Tensor | None, ...], params: list[Tensor], rows: int) -> Tensor:
    """Concatenate per-parameter gradient blocks (rows × *shape) into rows × P; None → zeros."""
    blocks = [
        (g if g is not None else torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)).reshape(rows, -1)
        for g, p in zip(grads, params)
    ]
    return torch.cat(blocks, dim=1)


def _loop_rows(losses: Tensor, params: list[Tensor], tasks: range, retain_graph: bool) -> Tensor:
    rows = []
    for i in tasks:
        keep = retain_graph or i != tasks[-1]
        grads = torch.autograd.grad(losses[i], params, retain_graph=keep, allow_unused=True)
        rows.append(_flatten_rows(tuple(None if g is None else g.unsqueeze(0) for g in grads), params, 1))
    return torch.cat(rows, dim=0)


def task_jacobian(
    losses: Tensor | Sequence[Tensor],
    params: Iterable[Tensor],
    chunk_size: int | None = None,
    retain_graph: bool = True,
    method: str = "batched",
) -> Tensor:
    """J[k] = ∇_params losses[k], flattened in the order of `params` (K × P).

    All K vector–Jacobian products run as one batched backward (`is_grads_batched`), or in
    chunks of `chunk_size` tasks to bound memory. If the batched backward raises (an op without
    a batching rule), the chunk is redone as a loop of K ordinary backward passes.
    `params` may include non-leaf tensors (MGDA-UB's representation). Parameters a task does not
    reach get zero gradient. The batched path always keeps the graph; `retain_graph=False` lets
    the loop path free it on its last pass.

    `method="loop"` takes K ordinary backward passes instead: the faster choice when each loss has a
    graph of its own (one forward per task), since a batched pass traverses every task's graph.
    Pass the K scalar losses as a sequence then: differentiating an entry of a stacked tensor sends
    (zero) gradients into every task's graph.
    """
    params = list(params)
    if method not in ("batched", "loop"):
        raise ValueError(f"method={method!r}; use 'batched' or 'loop'")
    if method == "loop":
        return _loop_rows(losses, params, range(len(losses)), retain_graph)
    if not isinstance(losses, Tensor):
        losses = torch.stack(list(losses))
    if losses.dim() != 1:
        raise ValueError(f"losses must be a vector of K task losses, got shape {tuple(losses.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    num_tasks = losses.numel()
    step = chunk_size or num_tasks
    identity = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
    blocks = []
    for start in range(0, num_tasks, step):
        tasks = range(start, min(start + step, num_tasks))
        try:
            grads = torch.autograd.grad(
                losses, params, grad_outputs=identity[tasks.start : tasks.stop],
                retain_graph=True, is_grads_batched=True, allow_unused=True,
            )
            blocks.append(_flatten_rows(grads, params, len(tasks)))
        except RuntimeError as error:
            logger.debug("batched task Jacobian failed (%s); looping over tasks", error)
            blocks.append(_loop_rows(losses, params, tasks, retain_graph or tasks.stop < num_tasks))
    return torch.cat(blocks, dim=0)


def unflatten_into_grads(d: Tensor, params: Iterable[Tensor], accumulate: bool = False) -> None:
    """Write the flat update d (P) into `p.grad` of `params`, in the order task_jacobian used.

    accumulate=False (default) replaces `p.grad` (use after `losses.sum().backward()` so the
    shared parameters get exactly d); accumulate=True adds d to existing gradients.
    """
    params = list(params)
    total = sum(p.numel() for p in params)
    if d.dim() != 1 or d.numel() != total:
        raise ValueError(f"d must be a vector of {total} entries (the parameters' size), got {tuple(d.shape)}")
    offset = 0
    for p in params:
        block = d[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if accumulate and p.grad is not None:
            p.grad.add_(block)
        else:
            set_grad(p, block, copy=True)  # a view of d: the grads must not alias the caller's tensor


def set_grad(p: Tensor, g: Tensor, copy: bool = False) -> None:
    """p.grad = g, as a tensor in p's memory layout and dtype (copied when they differ, or when `copy`).
    Fused optimizers assume the two layouts agree: given a contiguous grad for a channels-last conv weight
    they raise on CUDA and, on the CPU, silently update the wrong entries."""
    same = g.stride() == p.stride() and g.dtype == p.dtype
    p.grad = g if same and not copy else torch.empty_like(p).copy_(g)
