"""Pieces every metric shares: task losses, the parameters a task depends on, eval mode, devices."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("cross_entropy", "mse")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {list(LOSSES)}")
    return loss


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each example (shape N), averaged over any output elements beyond the class dim.

    `cross_entropy`: outputs N×C(×...) logits, integer targets N(×...).
    `mse`: outputs and targets of the same number of elements per example (N or N×1 both fine).
    """
    if check_loss(loss) == "cross_entropy":
        losses = F.cross_entropy(outputs, targets, reduction="none")
    else:
        losses = (outputs - targets.reshape(outputs.shape).to(outputs.dtype)).pow(2)
    return losses.reshape(losses.shape[0], -1).mean(dim=1)


def mean_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """The task's training loss on a batch: the mean of the per-example losses."""
    return per_example_loss(outputs, targets, loss).mean()


def task_named_parameters(model: nn.Module, task: str, scope: str = "task") -> dict[str, torch.Tensor]:
    """Name → parameter for the parameters task's loss depends on, in model order.

    scope "task": shared (encoder) parameters + the task's head; "shared": the encoder only.
    """
    if task not in model.heads:
        raise ValueError(f"unknown task {task!r}; the model's tasks are {list(model.heads)}")
    if scope == "task":
        wanted = {id(p) for p in [*model.shared_parameters(), *model.task_parameters(task)]}
    elif scope == "shared":
        wanted = {id(p) for p in model.shared_parameters()}
    else:
        raise ValueError(f"unknown parameter scope {scope!r}; valid scopes: ['task', 'shared']")
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device` if given, else where the model's parameters live."""
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (no dropout, running BN stats), then restore each one's mode."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in previous:
            module.training = training


def check_examples(x: torch.Tensor, y: torch.Tensor) -> int:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; pass one label per example")
    if len(x) == 0:
        raise ValueError("no examples given; pass at least one (x, y) pair")
    return len(x)


@torch.no_grad()
def batched_outputs(
    model: nn.Module, task: str, x: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None
) -> torch.Tensor:
    """The task's outputs for every example, in eval mode, without gradients (on the model's device)."""
    device = model_device(model, device)
    with evaluation_mode(model):
        batches = (x[start : start + batch_size].to(device) for start in range(0, len(x), batch_size))
        return torch.cat([model(batch, task) for batch in batches])
