"""SDMGrad (Xiao et al. 2023): stochastic direction-oriented multi-objective gradient descent."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators.base import check_number
from mtlcore.aggregators.modo import project_onto_simplex
from mtlcore.aggregators.multi_batch import MultiBatchAggregator


class SDMGrad(MultiBatchAggregator):
    """Three independent batches per step (ζ, the step's own batch, and ξ, ξ'). With A = J_ξ J_ξ'ᵀ / s² (s the mean
    of √A_kk, clipped at 0, plus 1e-8 on s²: the scale normalisation of the authors' code, so that lr does not
    depend on the gradients' size) and w̃ = 1/K, `n_iter` steps of projected SGD with momentum (a fresh momentum
    buffer each step, w warm-started from the last step's):

        v ← momentum·v + A(w + λw̃),   w ← Π_Δ(w − lr·v),        d = J_ζᵀ (w + λw̃)/(1 + λ).

    The authors' code takes lr = 10 (LibMTL 5; TorchJD 10) and λ = 0.3 in their experiments. The authors' MTL code
    uses one batch (A = J Jᵀ); the paper's algorithm, LibMTL and TorchJD use the two independent ones, as here.
    Heads get the step batch's gradients. w is state."""

    name = "sdmgrad"
    defaults = {"lamda": 0.3, "lr": 10.0, "momentum": 0.5, "n_iter": 20}

    state_attributes = ("w",)

    def _check_options(self, options):
        check_number(self.name, options, "lamda", 0.0)
        check_number(self.name, options, "lr", 0.0)
        check_number(self.name, options, "momentum", 0.0, 1.0)
        check_number(self.name, options, "n_iter", 1, integer=True)

    def _reset_state(self, num_tasks, device):
        self.w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)

    def _batch_weights(self, cross: Tensor, losses: list[Tensor]) -> Tensor:
        o = self.options
        K = len(cross)
        scale = cross.diagonal().clamp(min=0.0).sqrt().mean()
        A = cross / (scale**2 + 1e-8)
        preference = torch.full((K,), 1.0 / K, dtype=torch.float64)
        w, velocity = self.w, torch.zeros(K, dtype=torch.float64)
        for _ in range(o["n_iter"]):
            velocity = o["momentum"] * velocity + A @ (w + o["lamda"] * preference)
            w = project_onto_simplex(w - o["lr"] * velocity)
        self.w = w
        return (w + o["lamda"] * preference) / (1 + o["lamda"])
