"""UPGrad (Quinton & Rey 2024, TorchJD): the mean of each gᵢ projected onto the dual cone of J."""
from __future__ import annotations

import numpy as np

from mtlcore.aggregators._qp import project_weights_to_dual_cone, psd_factor, solve_or_uniform
from mtlcore.aggregators.base import WeightedAggregator, check_number, normalize_gramian


def regularized_gramian(G: np.ndarray, reg_eps: float) -> np.ndarray:
    """TorchJD's G / trace(G) + reg_eps·I: scale-free, and reg_eps > 0 makes the QP strictly convex."""
    G, _ = normalize_gramian(G)
    return G + reg_eps * np.eye(len(G))


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
            return sum(project_weights_to_dual_cone(row / num_tasks, G, R) for row in np.eye(num_tasks))

        return solve_or_uniform(self.name, solve, num_tasks)
