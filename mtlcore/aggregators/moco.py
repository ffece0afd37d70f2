"""MoCo (Fernando et al. 2023): MGDA on tracked (bias-corrected) task gradients."""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import (
    GradientAggregator,
    check_finite,
    check_number,
    diverged,
)
from mtlcore.aggregators.gramian import BLOCK_CPU, BLOCK_GPU, gramian

NORM_EPS = 1e-8  # the authors' shift of ‖g_k‖


def row_norms(J: torch.Tensor) -> torch.Tensor:
    """‖g_k‖ (float64, on J's device): sums of squares in float64 over column blocks (G's diagonal without the rest
    of G, and without a float64 copy of J)."""
    squares = torch.zeros(len(J), dtype=torch.float64, device=J.device)
    columns = max(1, (BLOCK_CPU if J.device.type == "cpu" else BLOCK_GPU) // len(J))
    for start in range(0, J.shape[1], columns):
        squares += J[:, start : start + columns].double().square().sum(dim=1)
    return squares.sqrt()


class MoCo(GradientAggregator):
    """Step t (from 1), as LibMTL's code from the authors:

        ĝ_k = L_k g_k / (‖g_k‖ + 1e-8)                 (each gradient rescaled to its loss)
        y ← y − β_t (y − ĝ),           β_t = β / t^β_σ  (the tracked gradients, K × P)
        λ ← softmax(λ − γ_t (y yᵀ + ρI) λ),  γ_t = γ / t^γ_σ,  λ₀ = 1/K
        d = yᵀλ

    The paper projects λ onto the simplex; the authors' code (and LibMTL) take the softmax, as here. d is not a
    combination of this step's gradients, so `weights` is NaN; λ is in the state (and a finished run's record).
    Needs the losses. y (J's dtype and device), λ and t are state."""

    name = "moco"
    defaults = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0}  # LibMTL's
    needs_losses = True
    state_attributes = ("tracked", "lambd", "step")

    def _check_options(self, options):
        check_number(self.name, options, "beta", 0.0, 1.0)
        for key in ("beta_sigma", "gamma", "gamma_sigma", "rho"):
            check_number(self.name, options, key, 0.0)

    def _reset_state(self, num_tasks, device):
        self.tracked: torch.Tensor | None = None
        self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.step = 0

    def _aggregate(self, J, losses):
        check_finite(self.name, J, "the task gradients J")
        J = J.detach()
        self.step += 1
        o = self.options
        norms = row_norms(J)
        scales = (losses.double() / (norms + NORM_EPS)).to(J)[:, None]  # ĝ_k = scale_k·g_k
        if self.tracked is None or self.tracked.shape != J.shape:
            self.tracked = torch.zeros_like(J)
        elif self.tracked.dtype != J.dtype or self.tracked.device != J.device:
            self.tracked = self.tracked.to(J)
        elif self.tracked.is_inference() and not torch.is_inference_mode_enabled():
            self.tracked = self.tracked.clone()
        beta = o["beta"] / self.step ** o["beta_sigma"]
        # y − β(y − ĝ) as (1 − β)y + βĝ, in place: no K×P temporaries
        self.tracked.mul_(1.0 - beta).addcmul_(J, scales, value=beta)
        Y = gramian(self.tracked).cpu() + o["rho"] * torch.eye(len(J), dtype=torch.float64)
        if not torch.isfinite(Y).all():
            raise diverged(self.name, "the tracked gradients")
        gamma = o["gamma"] / self.step ** o["gamma_sigma"]
        self.lambd = torch.softmax(self.lambd - gamma * (Y @ self.lambd), dim=0)
        return torch.mv(self.tracked.T, self.lambd.to(J)), torch.full((len(J),), math.nan)
