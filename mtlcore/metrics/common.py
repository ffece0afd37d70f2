"""Pieces every metric shares: the parameters a task depends on, eval mode, devices, batched outputs.

Every factor takes a task's examples as (inputs, targets), each a tensor or a mapping of tensors indexed along
the first dimension, and the task's `Loss` (`mtlcore.settings.base.Loss`), so it works for any setting.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mtlcore.settings.base import count, take, to_device


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


def check_examples(inputs: Any, targets: Any) -> int:
    n, m = count(inputs), count(targets)
    if n != m:
        raise ValueError(f"{n} inputs but {m} targets; pass one target per input")
    if n == 0:
        raise ValueError("no examples given; pass at least one (input, target) pair")
    return n


@torch.no_grad()
def batched_outputs(
    model: nn.Module, task: str, inputs: Any, batch_size: int = 512, device: torch.device | str | None = None
) -> torch.Tensor:
    """The task's outputs for every example, in eval mode, without gradients (on the model's device)."""
    device = model_device(model, device)
    with evaluation_mode(model):
        n = count(inputs)
        return torch.cat([model(to_device(take(inputs, slice(start, start + batch_size)), device), task)
                          for start in range(0, n, batch_size)])
