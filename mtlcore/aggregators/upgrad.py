"""UPGrad (Quinton & Rey 2024, TorchJD): the mean of each gᵢ projected onto the dual cone of J."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators._qp import project_weights_to_dual_cone, psd_factor, solve_or_uniform
from mtlcore.aggregators.base import WeightedAggregator, check_number, normalize_gramian


def regularized_gramian(G: Tensor, reg_eps: float) -> Tensor:
    """TorchJD's G / trace(G) + reg_eps·I: scale-free, and reg_eps > 0 makes the QP strictly convex."""
    G, _ = normalize_gramian(G)
    return G + reg_eps * torch.eye(len(G), dtype=G.dtype)


class DualConeAggregator(WeightedAggregator):
    """Shared option check of UPGrad and DualProj (TorchJD's reg_eps default 1e-4)."""

    defaults = {"reg_eps": 1e-4}

    def _check_options(self, options):
        check_number(self.name, options, "reg_eps", 0.0)


class UPGrad(DualConeAggregator):
    name = "upgrad"

    def _weights(self, G, losses):
        num_tasks = len(G)
        G = regularized_gramian(G, self.options["reg_eps"])

        def solve():
            R = psd_factor(G)  # one factorisation for the K projections
            return sum(project_weights_to_dual_cone(u, G, R) for u in torch.eye(num_tasks, dtype=G.dtype) / num_tasks)

        return solve_or_uniform(self.name, solve, num_tasks)
