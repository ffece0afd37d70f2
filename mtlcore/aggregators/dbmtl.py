"""DB-MTL (Lin et al. 2023): log-transformed losses, then gradient-magnitude balancing.

Gradient-level, because the balancing needs the task gradients: ∇log(L_k + ε) = g_k/(L_k + ε),
an EMA ĝ_k of these (β, LibMTL's schedule β/step^β_σ), then d = Σ_k (max_j ‖ĝ_j‖ / ‖ĝ_k‖) ĝ_k.
Needs the losses. The EMA mixes earlier steps' gradients, so no w with d = Jᵀw: `weights` is NaN.
Under `head_update: weighted` each head trains on ∇log(L_k + ε), as in the authors' code (LibMTL), which
backpropagates the log-losses and then replaces only the shared parameters' gradients.
"""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import GradientAggregator, check_finite, check_number, diverged
from mtlcore.aggregators.gramian import gramian


class DBMTL(GradientAggregator):
    name = "dbmtl"
    defaults = {"beta": 0.9, "beta_sigma": 0.0, "eps": 1e-8}  # LibMTL's defaults
    needs_losses = True
    state_attributes = ("buffer", "step")

    def _check_options(self, options):
        check_number(self.name, options, "beta", 0.0, 1.0)
        check_number(self.name, options, "beta_sigma", 0.0)
        check_number(self.name, options, "eps", 0.0)

    def _reset_state(self, num_tasks, device):
        self.buffer: torch.Tensor | None = None  # K × P EMA of the log-loss gradients
        self.step = 0

    def _aggregate(self, J, losses):
        check_finite(self.name, J, "the task gradients J")
        self.step += 1
        log_grads = J / (losses.to(J) + self.options["eps"]).unsqueeze(1)
        if self.buffer is None or self.buffer.shape != J.shape:
            self.buffer = torch.zeros_like(J)
        elif self.buffer.dtype != J.dtype or self.buffer.device != J.device:
            self.buffer = self.buffer.to(J)
        elif self.buffer.is_inference() and not torch.is_inference_mode_enabled():
            self.buffer = self.buffer.clone()  # made under inference_mode: not updatable in place outside it
        rate = self.options["beta"] / self.step ** self.options["beta_sigma"]
        # buffer = log_grads + rate·(buffer − log_grads), in place: the same rounding without three K×P temporaries
        self.buffer.detach_().sub_(log_grads).mul_(rate).add_(log_grads)
        # ‖ĝ_k‖ from G's diagonal: float64 sums of exact squares (no overflow for huge J) without a float64 copy of
        # the whole buffer
        squares = gramian(self.buffer).diagonal()
        if not torch.isfinite(squares).all():  # J is checked, but a zero loss with eps=0 makes ∇log L infinite
            raise diverged(self.name, "the log-loss gradients ∇log(L_k + ε)")
        norms = squares.sqrt().to(J)
        balance = torch.where(norms > 0, norms.max() / norms.clamp_min(torch.finfo(J.dtype).tiny), 0.0)
        return balance @ self.buffer, torch.full((J.shape[0],), math.nan)

    def head_weights(self, losses):
        return 1.0 / (losses.detach() + self.options["eps"])
