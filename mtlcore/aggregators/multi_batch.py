"""Methods that need more than one batch per step: the task weights are learned from the product of two independent
batches' Jacobians (an unbiased estimate of the Gramian's action), and applied to a third batch's."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlcore.aggregators.base import GradientAggregator, check_finite, diverged, require
from mtlcore.aggregators.gramian import BLOCK_CPU, BLOCK_GPU


class MultiBatchAggregator(GradientAggregator):
    """`agg.aggregate_batches([J_ζ, J_ξ, J_ξ'], [L_ζ, L_ξ, L_ξ'])` → d = J_ζᵀw, with w from the K×K cross-product
    J_ξ J_ξ'ᵀ (float64 sums, on the CPU) and the state: subclasses write `_batch_weights(cross, losses)`.
    `batches_per_step` = 3; J_ζ is the Jacobian of the step's own batch, the others of the extra batches the update
    rule draws (`mtlcore.training.updates`). One batch alone is refused: J_ξ J_ξᵀ is a biased estimate, and
    using it would be another method."""

    batches_per_step: ClassVar[int] = 3

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        raise ValueError(f"{self.name}: needs {self.batches_per_step} independent batches per step; call "
                         "agg.aggregate_batches([J_step, J_extra1, J_extra2], losses) (the Jacobian update rule "
                         "draws the extra batches from the run's batch source)")

    def aggregate_batches(self, jacobians: list[Tensor], losses: list[Tensor] | None = None) -> Tensor:
        require(
            len(jacobians) == self.batches_per_step,
            f"{self.name}: needs {self.batches_per_step} Jacobians (the step's batch and "
            f"{self.batches_per_step - 1} independent ones), got {len(jacobians)}",
        )
        for J in jacobians:
            self._check_jacobian(J)
            require(J.shape == jacobians[0].shape,
                    f"{self.name}: the batches' Jacobians differ in shape: {[tuple(j.shape) for j in jacobians]}")
            check_finite(self.name, J, "the task gradients J")
        for batch_losses in losses or []:
            check_finite(self.name, batch_losses, "the losses")
        first, second = (J.detach() for J in jacobians[1:3])
        cross = torch.zeros(len(first), len(first), dtype=torch.float64, device=first.device)
        columns = max(1, (BLOCK_CPU if first.device.type == "cpu" else BLOCK_GPU) // len(first))
        for start in range(0, first.shape[1], columns):  # float64 sums without a float64 copy of J
            cross.addmm_(first[:, start : start + columns].double(), second[:, start : start + columns].double().T)
        cross = cross.cpu()
        if not torch.isfinite(cross).all():
            raise diverged(self.name, "the task gradients J")
        weights = self._batch_weights(cross, losses or [])
        self._set_weights(weights)
        J = jacobians[0]
        return torch.mv(J.T, weights.to(J))

    def _batch_weights(self, cross: Tensor, losses: list[Tensor]) -> Tensor:
        raise NotImplementedError
