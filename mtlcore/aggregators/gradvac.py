"""Gradient Vaccine (Wang et al. 2021): raise each pair's cosine to an EMA target.

Like PCGrad, g̃_i = Σ_j A_ij g_j is tracked through its coefficients on the original rows, so
everything runs on G. Whole-model granularity (LibMTL's GradVac_group_type=0).
"""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import WeightedAggregator, check_number, normalize_gramian
from mtlcore.aggregators.pcgrad import others_in_random_order

# LibMTL's guard adds 1e-8 to the denominators; here it scales them by 1 + 1e-8, so that it stays relative for
# a small gradient among large ones (an added 1e-8 distorted such cosines by ~10%), and zero ones are skipped.
_EPS = 1e-8


class GradVac(WeightedAggregator):
    name = "gradvac"
    defaults = {"beta": 0.5}  # LibMTL's default; the paper used 1e-2
    randomised = True
    draws_on_host = True
    state_attributes = ("targets",)

    def _check_options(self, options):
        check_number(self.name, options, "beta", 0.0, 1.0)  # EMA rate of the cosine targets

    def _reset_state(self, num_tasks, device):
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)  # ρ̂_ij, start at 0

    def _weights(self, G, losses):
        G, _ = normalize_gramian(G)
        beta, num_tasks = self.options["beta"], len(G)
        targets = self.targets.clone()
        A = torch.eye(num_tasks, dtype=G.dtype)
        rows = torch.arange(num_tasks)
        for j in others_in_random_order(num_tasks, self.generator).T:  # every task's t-th other task j_i at once
            norm_i = ((A @ G) * A).sum(dim=1).clamp(min=0.0).sqrt()  # ‖g̃_i‖
            norm_j = G[j, j].clamp(min=0.0).sqrt()
            norms = norm_i * norm_j
            cosine = torch.where(norms > 0, (A * G[:, j].T).sum(dim=1) / (norms * (1 + _EPS)), 0.0)
            target = targets[rows, j]
            sin_target = (1 - target**2).clamp(min=0.0).sqrt()
            raised = (
                norm_i * (target * (1 - cosine**2).clamp(min=0.0).sqrt() - cosine * sin_target)
                / (norm_j * sin_target * (1 + _EPS))
            )
            A[rows, j] += torch.where((cosine < target) & (norm_j * sin_target > 0), raised, 0.0)
            targets[rows, j] = (1 - beta) * target + beta * cosine
        self.targets = targets
        return A.sum(dim=0)
