"""Losses and scores shared by the classification settings (their folders import them; the core never does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mtlcore.settings.base import Loss, Score


class CrossEntropy(Loss):
    """−log softmax(outputs)[target] per example (outputs N×C); its predictive distribution is the softmax."""

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else outputs.device
        probabilities = torch.softmax(outputs.detach().to(device), dim=1)
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(outputs.device)


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[correct predictions, examples], summed over a split."""
    return torch.stack([(outputs.argmax(dim=1) == targets).sum().double(),
                        torch.tensor(float(len(targets)), dtype=torch.float64, device=outputs.device)])


ACCURACY = Score("accuracy", higher_is_better=True, statistics=_correct, value=lambda total: float(total[0] / total[1]),
                 percent=True)
