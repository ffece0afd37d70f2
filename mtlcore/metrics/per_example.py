"""Per-example gradients: torch.func (vmap of grad) in chunks, with a plain autograd loop as fallback.

The one helper that Fisher trace and gradient coherence build on. Gradients are flattened in model
parameter order over the parameters the task's loss depends on (`scope="task"`: encoder + the task's
head) or the encoder only (`scope="shared"`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from mtlcore.metrics.common import check_examples, evaluation_mode, model_device, task_named_parameters
from mtlcore.settings.base import Loss, count, take, to_device

logger = logging.getLogger(__name__)

METHODS = ("auto", "vmap", "loop")


def _one(data):
    return tree_map(lambda t: t.unsqueeze(0), data)


def _vmap_gradients(model, task, parameters, x, y, loss: Loss) -> list[torch.Tensor]:
    def example_loss(params, xi, yi):
        outputs = functional_call(model, params, (_one(xi), task))
        return loss(outputs, _one(yi)).squeeze(0)

    detached = {name: p.detach() for name, p in parameters.items()}
    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(detached, x, y)
    n = count(y)
    return [grads[name].reshape(n, -1) for name in parameters]  # one n × P_k block per parameter


def _loop_gradients(model, task, parameters, x, y, loss: Loss) -> list[torch.Tensor]:
    tensors = list(parameters.values())
    rows = []
    for i in range(count(y)):
        xi, yi = take(x, slice(i, i + 1)), take(y, slice(i, i + 1))
        example_loss = loss(model(xi, task), yi).squeeze(0)
        grads = torch.autograd.grad(example_loss, tensors, allow_unused=True)
        # A parameter the output does not reach (e.g. behind a ReLU that is off) has gradient zero.
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, tensors)]))
    return [torch.stack(rows)]


def _gradient_blocks(
    model: nn.Module,
    task: str,
    x,
    y,
    *,
    loss: Loss,
    scope: str = "task",
    chunk_size: int = 256,
    method: str = "auto",
    device: torch.device | str | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Per chunk, the per-example gradients as column blocks (n × P_k each; the loop gives one n × P block)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    n = check_examples(x, y)
    device = model_device(model, device)
    parameters = task_named_parameters(model, task, scope)
    with evaluation_mode(model):
        for start in range(0, n, chunk_size):
            x_chunk = to_device(take(x, slice(start, start + chunk_size)), device)
            y_chunk = to_device(take(y, slice(start, start + chunk_size)), device)
            if method == "loop":
                yield _loop_gradients(model, task, parameters, x_chunk, y_chunk, loss)
                continue
            try:
                chunk = _vmap_gradients(model, task, parameters, x_chunk, y_chunk, loss)
            except Exception as error:  # noqa: BLE001 - any torch.func failure means "use the loop"
                if method == "vmap":
                    raise
                logger.warning("vmap per-example gradients failed (%s); using the loop instead", error)
                method = "loop"
                chunk = _loop_gradients(model, task, parameters, x_chunk, y_chunk, loss)
            yield chunk


def per_example_gradient_chunks(model: nn.Module, task: str, x, y, **options) -> Iterator[torch.Tensor]:
    """Yield per-example gradients chunk by chunk: tensors of shape (≤ chunk_size) × P, in example order.

    x, y: the inputs and targets (tensors, or mappings of tensors, one entry per example along dim 0).
    Options (keyword, defaults in `_gradient_blocks`): `loss` (the task's Loss, required), `scope` ("task" or
    "shared"), `chunk_size` (256), `method` ("auto", "vmap" or "loop") and `device`. The model is in eval
    mode while the chunks are produced and back in its previous mode once the iterator is exhausted or
    closed. `method="auto"` uses vmap and falls back to the loop (logging a warning) if vmap raises, e.g.
    for modules that torch.func cannot transform.
    """
    with closing(_gradient_blocks(model, task, x, y, **options)) as chunks:
        for blocks in chunks:
            yield blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def per_example_gradients(model: nn.Module, task: str, x, y, **options) -> torch.Tensor:
    """All per-example gradients as one N × P tensor (memory N·P floats; prefer the chunks or norms)."""
    return torch.cat(list(per_example_gradient_chunks(model, task, x, y, **options)))


def per_example_squared_norms(model: nn.Module, task: str, x, y, **options) -> torch.Tensor:
    """‖∇_w ℓ(f(x_i), y_i)‖² for every example (shape N), without holding all gradients at once."""
    # Summed block by block: concatenating the vmap blocks into one n × P tensor first cost 6-15% more time.
    with closing(_gradient_blocks(model, task, x, y, **options)) as chunks:
        return torch.cat([sum(block.pow(2).sum(dim=1) for block in blocks) for blocks in chunks])
