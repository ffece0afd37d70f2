"""Krum and Multi-Krum (Blanchard et al. 2017): the task gradient(s) closest to their nearest neighbours."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import WeightedAggregator, check_number, require


def krum_scores(G: torch.Tensor, n_byzantine: int) -> torch.Tensor:
    """s(i) = Σ ‖g_i − g_j‖² over the K − f − 2 gradients j ≠ i closest to g_i (Blanchard et al.'s score),
    the squared distances read from G: ‖g_i − g_j‖² = G_ii + G_jj − 2G_ij."""
    diagonal = G.diagonal()
    squared = (diagonal[:, None] + diagonal[None, :] - 2 * G).clamp(min=0.0)
    squared.fill_diagonal_(float("inf"))  # i is not its own neighbour
    neighbours = len(G) - n_byzantine - 2
    return torch.sort(squared, dim=1).values[:, :neighbours].sum(dim=1)


class Krum(WeightedAggregator):
    """d = the mean of the n_selected gradients of lowest score (n_selected = 1: Krum, the one gradient chosen;
    more: Multi-Krum); needs K ≥ n_byzantine + 3 and K ≥ n_selected. Ties go to the lower task index.

    The paper scores by squared distances; TorchJD's `Krum` sums the distances themselves, which can select
    another gradient: this follows the paper. TorchJD requires n_byzantine; 0 here (no adversary assumed)."""

    name = "krum"
    defaults = {"n_byzantine": 0, "n_selected": 1}

    def _check_options(self, options):
        check_number(self.name, options, "n_byzantine", 0, integer=True)
        check_number(self.name, options, "n_selected", 1, integer=True)

    def _reset_state(self, num_tasks, device):
        f, m = self.options["n_byzantine"], self.options["n_selected"]
        require(
            num_tasks >= f + 3 and num_tasks >= m,
            f"krum: needs at least n_byzantine + 3 = {f + 3} and n_selected = {m} tasks, got {num_tasks} tasks",
        )

    def _weights(self, G, losses):
        scores = krum_scores(G, self.options["n_byzantine"])
        selected = torch.sort(scores, stable=True).indices[: self.options["n_selected"]]
        weights = torch.zeros(len(G), dtype=torch.float64)
        weights[selected] = 1.0 / len(selected)
        return weights
