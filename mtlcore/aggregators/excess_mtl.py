"""ExcessMTL (He et al. 2024): task weights that grow with each task's estimated excess risk."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import GradientAggregator, check_finite, check_number
from mtlcore.aggregators.gramian import BLOCK_CPU, BLOCK_GPU

HESSIAN_EPS = 1e-7  # the authors' shift inside the AdaGrad square root


class ExcessMTL(GradientAggregator):
    """d = Jᵀw. Per step, for each task: S_k += g_k² (elementwise, AdaGrad's diagonal Hessian estimate, Eq. 7),
    excess risk e_k = g_kᵀ diag(√(S_k + 1e-7))⁻¹ g_k (Eq. 6). The first step records e⁰ and keeps w = 1; every
    later step w_k ← w_k·exp(η e_k/e⁰_k), renormalised to Σw = K (Eq. 9), as the authors' and LibMTL's code do
    (the paper's simplex 1/K is the same direction, K times shorter). The update is done in log space (a softmax),
    so that a large e_k/e⁰_k saturates instead of overflowing; a task with e⁰_k = 0 (zero first gradient) gets no
    increase instead of the authors' division by zero. TorchJD's ExcessMTL starts from 1/K and already updates at
    the first step, with the raw e⁰; here, as in the authors' code, the first step only records e⁰. S (K×P, J's
    dtype and device), e⁰ and w are state."""

    name = "excess_mtl"
    defaults = {"robust_step_size": 1e-2}  # LibMTL's robust_step_size
    state_attributes = ("squared_sum", "initial_excess", "task_weights")

    def _check_options(self, options):
        check_number(self.name, options, "robust_step_size", 0.0)

    def _reset_state(self, num_tasks, device):
        self.squared_sum: torch.Tensor | None = None
        self.initial_excess: torch.Tensor | None = None
        self.task_weights = torch.ones(num_tasks, dtype=torch.float64)

    def _aggregate(self, J, losses):
        check_finite(self.name, J, "the task gradients J")
        gradients = J.detach()
        if self.squared_sum is None or self.squared_sum.shape != J.shape:
            self.squared_sum = torch.zeros_like(gradients)
        elif self.squared_sum.dtype != J.dtype or self.squared_sum.device != J.device:
            self.squared_sum = self.squared_sum.to(gradients)
        self.squared_sum.addcmul_(gradients, gradients)
        # in column blocks: the elementwise quotient of all of J would allocate K×P temporaries
        excess = torch.zeros(len(J), dtype=torch.float64, device=J.device)
        columns = max(1, (BLOCK_CPU if J.device.type == "cpu" else BLOCK_GPU) // len(J))
        for start in range(0, J.shape[1], columns):
            block = gradients[:, start : start + columns]
            root = self.squared_sum[:, start : start + columns].add(HESSIAN_EPS).sqrt_()
            excess += (block.square() / root).sum(dim=1, dtype=torch.float64)
        excess = excess.cpu()
        if self.initial_excess is None:
            self.initial_excess = excess
        else:
            initial = self.initial_excess
            ratio = torch.where(initial > 0, excess / torch.where(initial > 0, initial, 1.0), 0.0)
            logits = self.task_weights.log() + self.options["robust_step_size"] * ratio
            self.task_weights = len(excess) * torch.softmax(logits, dim=0)
        weights = self.task_weights.clone()
        return torch.mv(J.T, weights.to(J)), weights
