"""PCGrad (Yu et al. 2020): project each gradient off the others it conflicts with.

Every projection is onto an original g_j, so g̃_i = Σ_j A_ij g_j stays a combination of the rows
of J and all inner products come from G: d = Jᵀw with w = column sums of A.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators.base import WeightedAggregator, require


def others_in_random_order(num_tasks: int, generator: torch.Generator | None) -> Tensor:
    """Row i: the tasks j ≠ i in a random order (K × K−1), one permutation drawn from `generator` (global RNG when
    None) per task in turn, as PCGrad's loop over the tasks draws them."""
    device = generator.device if generator is not None else "cpu"
    orders = [torch.randperm(num_tasks, generator=generator, device=device).cpu() for _ in range(num_tasks)]
    return torch.stack([order[order != i] for i, order in enumerate(orders)])


def pcgrad_coefficients(G: Tensor, generator: torch.Generator | None) -> Tensor:
    """A with g̃_i = Σ_j A_ij g_j after PCGrad's sequential projections (Yu et al., Alg. 1). The tasks' sequences
    are independent: step t projects every g̃_i on its t-th other task j_i at once."""
    num_tasks = len(G)
    A = torch.eye(num_tasks, dtype=G.dtype)
    rows = torch.arange(num_tasks)
    for j in others_in_random_order(num_tasks, generator).T:
        inner = (A * G[:, j].T).sum(dim=1)  # g̃_i · g_j
        squared = G[j, j]
        A[rows, j] -= torch.where((inner < 0) & (squared > 0), inner / squared, 0.0)
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
        weights = pcgrad_coefficients(G, self.generator).sum(dim=0)
        return weights / len(G) if self.options["reduction"] == "mean" else weights
