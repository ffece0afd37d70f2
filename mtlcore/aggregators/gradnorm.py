"""GradNorm (Chen et al. 2018): learn task weights that equalise gradient norms at rates r_i^α."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_finite, check_number, require
from mtlcore.aggregators.jacobian import task_jacobian

_MIN_WEIGHT = 1e-8  # weights are clamped positive before renormalising (the paper is silent)


class GradNorm(LossAggregator):
    """combine(losses, last_shared=model.last_shared_layer()) -> Σ w_i L_i.

    Each call: G_i = w_i ‖∇_W L_i‖ on the last shared layer W (its weight and bias: every parameter
    `last_shared_layer()` returns; LibMTL uses all shared parameters); r_i = (L_i/L_i(0)) / mean_j(·);
    L_grad = Σ_i |G_i − sg[mean(G) r_i^α]|; one step of the internal Adam (learning rate `lr`)
    on w using L_grad only; then w ← K w / Σw. The returned loss uses the weights from before
    the update (they are `weights`). L_i(0) are the losses of the first call after reset.
    """

    name = "gradnorm"
    defaults = {"alpha": 1.5, "lr": 0.025}
    needs_last_shared = True
    state_attributes = ("task_weights", "optimizer", "initial_losses")

    def _check_options(self, options):
        check_number(self.name, options, "alpha", 0.0)
        check_number(self.name, options, "lr", 0.0)

    def _reset_state(self, num_tasks, device):
        self.task_weights = torch.ones(num_tasks, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.task_weights], lr=self.options["lr"])
        self.initial_losses: torch.Tensor | None = None

    def _combine(self, losses, last_shared):
        require(
            last_shared is not None and len(list(last_shared)) > 0,
            "gradnorm: pass combine(losses, last_shared=model.last_shared_layer()) "
            "(the parameters W of the last shared layer)",
        )
        weights_now = self.task_weights.detach().clone()
        if self.initial_losses is None:
            self.initial_losses = losses.detach().clone()
        # ‖∇_W L_i‖ does not depend on w, so G_i = w_i ‖∇_W L_i‖ needs no second-order graph.
        grad_norms = task_jacobian(losses, list(last_shared)).detach().double().norm(dim=1)
        check_finite(self.name, grad_norms, "the gradient norms on the last shared layer")
        self._update_weights(losses.detach(), grad_norms)
        return self._weighted_sum(losses, weights_now)

    def preview_weights(self, losses):
        """The current w: a step applies the weights from before its own update (its combine needs the last shared
        layer's gradients, which only the training step has)."""
        self._ensure_tasks(losses.numel())
        return self.task_weights.detach().to("cpu", torch.float64, copy=True)

    def _update_weights(self, losses: torch.Tensor, grad_norms: torch.Tensor) -> None:
        ratios = (losses / self.initial_losses.clamp_min(torch.finfo(losses.dtype).tiny)).double()
        relative_rates = ratios / ratios.mean()
        weights = self.task_weights
        with torch.enable_grad():
            gradient_magnitudes = weights.double() * grad_norms.to(weights.device)
            targets = (gradient_magnitudes.mean() * relative_rates.to(weights.device) ** self.options["alpha"]).detach()
            grad_loss = (gradient_magnitudes - targets).abs().sum()
            (weights.grad,) = torch.autograd.grad(grad_loss, [weights])
        self.optimizer.step()
        with torch.no_grad():
            weights.clamp_(min=_MIN_WEIGHT)
            weights.mul_(len(weights) / weights.sum())
