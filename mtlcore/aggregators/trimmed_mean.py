"""Coordinate-wise trimmed mean (Yin et al. 2018): in each coordinate, drop the largest and smallest entries."""
from __future__ import annotations

import math

import torch

from mtlcore.aggregators.base import (
    GradientAggregator,
    check_finite,
    check_number,
    require,
)
from mtlcore.aggregators.gramian import BLOCK_CPU, BLOCK_GPU


class TrimmedMean(GradientAggregator):
    """d_j = the mean of column j of J without its `trim_number` largest and `trim_number` smallest entries (K − 2b
    remain; needs K ≥ 2b + 1). A different subset of tasks in each coordinate, so no w with d = Jᵀw: `weights` is
    NaN. TorchJD requires trim_number; 1 here, the least that trims anything."""

    name = "trimmed_mean"
    defaults = {"trim_number": 1}

    def _check_options(self, options):
        check_number(self.name, options, "trim_number", 0, integer=True)

    def _reset_state(self, num_tasks, device):
        b = self.options["trim_number"]
        require(num_tasks >= 2 * b + 1,
                f"trimmed_mean: needs at least 2·trim_number + 1 = {2 * b + 1} tasks, got {num_tasks} tasks")

    def _aggregate(self, J, losses):
        check_finite(self.name, J, "the task gradients J")
        b, num_tasks = self.options["trim_number"], J.shape[0]
        # in column blocks: a sort of all of J would hold a K×P copy and K×P int64 indices at once
        columns = max(1, (BLOCK_CPU if J.device.type == "cpu" else BLOCK_GPU) // num_tasks)
        d = torch.empty(J.shape[1], dtype=J.dtype, device=J.device)
        for start in range(0, J.shape[1], columns):
            block = torch.sort(J[:, start : start + columns], dim=0).values
            d[start : start + columns] = block[b : num_tasks - b].mean(dim=0)
        return d, torch.full((num_tasks,), math.nan)
