"""FAMO (Liu et al. 2023): fast adaptive multitask optimisation, O(1) extra cost per step."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_finite, check_number, require


class FAMO(LossAggregator):
    """combine: z = softmax(ξ), returns Σ z_i log(L_i + ε) / c with c = sg[Σ z_i/(L_i + ε)].

    after_step(losses of the same batch after the optimizer step): δ_i = log(L_i + ε) before −
    after; ξ takes one Adam step (lr, weight decay γ) along ∂softmax(ξ)ᵀδ. `weights` holds the
    effective weights z_i / (c (L_i + ε)) of ∇L_i (they sum to 1). The authors' experiment code calls a
    gradient-norm clip (max_norm 1.0) before `backward`, where it changes nothing; it is not done here.
    """

    name = "famo"
    defaults = {"gamma": 1e-3, "lr": 0.025, "eps": 1e-8}
    needs_losses_after = True
    state_attributes = ("logits", "optimizer", "previous_losses")

    def _check_options(self, options):
        check_number(self.name, options, "gamma", 0.0)
        check_number(self.name, options, "lr", 0.0)
        check_number(self.name, options, "eps", 0.0)

    def _reset_state(self, num_tasks, device):
        self.logits = torch.zeros(num_tasks, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.options["lr"], weight_decay=self.options["gamma"])
        self.previous_losses: torch.Tensor | None = None

    def _combine(self, losses, last_shared):
        z = torch.softmax(self.logits.detach(), dim=0).to(losses)
        shifted = losses + self.options["eps"]
        c = (z / shifted).sum().detach()
        self.previous_losses = losses.detach().clone()
        return (z * torch.log(shifted)).sum() / c, z / (c * shifted.detach())

    def after_step(self, losses_after):
        require(self.previous_losses is not None, "famo: after_step() needs a combine() call before it")
        losses_after = losses_after.detach()
        require(
            losses_after.shape == self.previous_losses.shape,
            f"famo: expected {self.num_tasks} losses after the step, got shape {tuple(losses_after.shape)}",
        )
        check_finite(self.name, losses_after, "the losses after the step")
        eps = self.options["eps"]
        delta = torch.log(self.previous_losses + eps) - torch.log(losses_after + eps)
        with torch.enable_grad():
            (self.logits.grad,) = torch.autograd.grad(
                torch.softmax(self.logits, dim=0), [self.logits], grad_outputs=delta.to(self.logits)
            )
        self.optimizer.step()
        self.previous_losses = None
