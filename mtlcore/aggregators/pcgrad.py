"""PCGrad (Yu et al. 2020): project each gradient off the others it conflicts with.

Every projection is onto an original g_j, so g̃_i = Σ_j A_ij g_j stays a combination of the rows
of J and all inner products come from G: d = Jᵀw with w = column sums of A.
"""
from __future__ import annotations

import numpy as np
import torch

from mtlcore.aggregators.base import WeightedAggregator, require


def others_in_random_order(i: int, num_tasks: int, generator: torch.Generator | None) -> list[int]:
    """The tasks j ≠ i in a random order drawn from `generator` (global RNG when None)."""
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(num_tasks, generator=generator, device=device).tolist()
    return [j for j in order if j != i]


def pcgrad_coefficients(G: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
    """A with g̃_i = Σ_j A_ij g_j after PCGrad's sequential projections (Yu et al., Alg. 1)."""
    num_tasks = len(G)
    A = np.eye(num_tasks)
    for i in range(num_tasks):
        for j in others_in_random_order(i, num_tasks, generator):
            inner = A[i] @ G[:, j]  # g̃_i · g_j
            if inner < 0 and G[j, j] > 0:
                A[i, j] -= inner / G[j, j]
    return A


class PCGrad(WeightedAggregator):
    name = "pcgrad"
    defaults = {"reduction": "sum"}
    randomised = True
    draws_on_host = True

    def _check_options(self, options):
        require(
            options["reduction"] in ("sum", "mean"),
            f"pcgrad: reduction must be 'sum' or 'mean', got {options['reduction']!r}",
        )

    def _weights(self, G, losses):
        weights = pcgrad_coefficients(G, self.generator).sum(axis=0)
        return weights / len(G) if self.options["reduction"] == "mean" else weights
