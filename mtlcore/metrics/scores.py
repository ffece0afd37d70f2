"""Task losses and scores over a whole split, and the training-loss summary of a trajectory."""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mtlcore.metrics.common import evaluation_mode, model_device
from mtlcore.settings.base import Examples, SettingData, Task, to_device


class Evaluation(NamedTuple):
    loss: float  # mean per-example loss over the split
    scores: dict[str, float]  # every score of the task, by name


class _Totals:
    """Per-example losses and each score's summed statistics of one task, batch by batch."""

    def __init__(self, task: Task):
        self.task, self.losses, self.statistics = task, [], [None] * len(task.scores)

    def add(self, outputs: torch.Tensor, targets) -> None:
        self.losses.append(self.task.loss(outputs, targets))
        for i, score in enumerate(self.task.scores):
            stats = score.statistics(outputs, targets).to("cpu", torch.float64)
            self.statistics[i] = stats if self.statistics[i] is None else self.statistics[i] + stats

    def result(self) -> Evaluation:
        # The mean of all per-example losses at once: the same rounding whatever the evaluation batch size.
        loss = torch.cat(self.losses).mean().item()
        return Evaluation(loss, {s.name: s.value(t) for s, t in zip(self.task.scores, self.statistics)})


def _batches(examples: Examples, batch_size: int, device: torch.device):
    for start in range(0, len(examples), batch_size):
        inputs, targets = examples.take(slice(start, start + batch_size))
        yield to_device(inputs, device), to_device(targets, device)


@torch.no_grad()
def evaluate(model: nn.Module, tasks: Mapping[str, Task], data: SettingData, split: str, batch_size: int = 1024,
             device: torch.device | str | None = None) -> dict[str, Evaluation]:
    """Every task's mean loss and scores on `split`, in eval mode without gradients (the mode is restored).

    In a single-input setting the encoder runs once per batch for all tasks; otherwise each task's examples go
    through the model on their own.
    """
    device = model_device(model, device)
    totals = {name: _Totals(task) for name, task in tasks.items()}
    with evaluation_mode(model):
        if data.joint is not None:
            for inputs, targets in _batches(data.joint[split], batch_size, device):
                features = model.encoder(inputs)
                for name in tasks:
                    totals[name].add(model.heads[name](features), targets[name])
        else:
            for name in tasks:
                for inputs, targets in _batches(data.examples[split][name], batch_size, device):
                    totals[name].add(model(inputs, name), targets)
    return {name: total.result() for name, total in totals.items()}


def min_training_loss(train_loss_trajectory) -> float:
    """The smallest training loss measured along a trajectory; NaN (unmeasured) epochs are ignored.

    NaN when nothing was measured.
    """
    values = np.asarray(train_loss_trajectory, dtype=float)
    return float(np.nanmin(values)) if (~np.isnan(values)).any() else float("nan")


__all__ = ["Evaluation", "evaluate", "min_training_loss"]
