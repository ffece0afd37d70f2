"""MoDo (Chen et al. 2023): multi-objective gradient descent with double sampling of the task weights' update."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators.base import check_number
from mtlcore.aggregators.multi_batch import MultiBatchAggregator


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of v onto {w ≥ 0, Σw = 1} (the sort-based algorithm of Held et al. / Duchi et al.)."""
    u = torch.sort(v, descending=True).values
    cumulative = u.cumsum(0) - 1.0
    ranks = torch.arange(1, len(v) + 1, dtype=v.dtype)
    last = int(torch.nonzero(u - cumulative / ranks > 0)[-1])
    return (v - cumulative[last] / (last + 1)).clamp(min=0.0)


class MoDo(MultiBatchAggregator):
    """Three independent batches per step (ζ, the step's own batch, and ξ, ξ'):

        λ ← Π_Δ(λ − γ (J_ξ J_ξ'ᵀ λ + ρ λ)),  λ₀ = 1/K,     d = J_ζᵀ λ

    (Eq. 2.9 of the paper with its three-sample variant, as LibMTL's and the authors' code with `three_grads`): the
    product of two independent batches' Jacobians is an unbiased estimate of the Gramian's action, which J_ξJ_ξᵀ is
    not. Heads get the step batch's gradients (weighted by λ under `head_update: weighted`); LibMTL instead
    averages each head's gradient over the three batches. λ is state. Defaults: LibMTL's MoDo_gamma, MoDo_rho
    (TorchJD's MoDoWeighting defaults to γ = 0.1)."""

    name = "modo"
    defaults = {"gamma": 1e-3, "rho": 0.1}
    state_attributes = ("lambd",)

    def _check_options(self, options):
        check_number(self.name, options, "gamma", 0.0)
        check_number(self.name, options, "rho", 0.0)

    def _reset_state(self, num_tasks, device):
        self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def _batch_weights(self, cross: Tensor, losses: list[Tensor]) -> Tensor:
        o = self.options
        self.lambd = project_onto_simplex(self.lambd - o["gamma"] * (cross @ self.lambd + o["rho"] * self.lambd))
        return self.lambd.clone()
