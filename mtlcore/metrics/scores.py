"""Task scores and the training-loss summary of a trajectory."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mtlcore.metrics.common import batched_outputs, check_examples, check_loss, per_example_loss


class Evaluation(NamedTuple):
    loss: float  # mean per-example loss
    accuracy: float  # NaN for regression


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions (argmax over dim 1) equal to the labels; dense outputs count every element."""
    return (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()


def evaluate(
    model: nn.Module,
    task: str,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 512,
    *,
    loss: str = "cross_entropy",
    device: torch.device | str | None = None,
) -> Evaluation:
    """(mean loss, accuracy) of the task on (x, y), in eval mode without gradients; the mode is restored."""
    check_loss(loss)
    check_examples(x, y)
    outputs = batched_outputs(model, task, x, batch_size, device)
    targets = y.to(outputs.device)
    mean = per_example_loss(outputs, targets, loss).mean().item()
    return Evaluation(mean, accuracy(outputs, targets) if loss == "cross_entropy" else float("nan"))


def min_training_loss(train_loss_trajectory) -> float:
    """The smallest training loss measured along a trajectory; NaN (unmeasured) epochs are ignored.

    NaN when nothing was measured.
    """
    values = np.asarray(train_loss_trajectory, dtype=float)
    return float(np.nanmin(values)) if (~np.isnan(values)).any() else float("nan")
