"""CAGrad (Liu et al. 2021): the best worst-task improvement within a ball around the mean."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtlcore.aggregators._qp import SolverError, solve_or_uniform
from mtlcore.aggregators.base import WeightedAggregator, check_number, normalize_gramian, require

RESCALES = {0: lambda c: 1.0, 1: lambda c: 1.0 + c**2, 2: lambda c: 1.0 + c}  # d is divided by this


def cagrad_weights(G: Tensor, c: float) -> Tensor:
    """Weights of d = g₀ + (c‖g₀‖/‖g_w‖) g_w, i.e. 1/K + λw (before rescaling).

    w* = argmin_{w∈Δ} wᵀJg₀ + c‖g₀‖‖Jᵀw‖, solved by SLSQP from the uniform start as in the
    authors' code (their +1e-8 inside the square root, here on the trace-normalised G, where the
    minimiser is the same because every term scales alike).
    """
    num_tasks = len(G)
    G = normalize_gramian(G)[0].numpy()  # SLSQP runs on numpy arrays
    mean_weights = np.full(num_tasks, 1.0 / num_tasks)
    g0_norm = np.sqrt(max(mean_weights @ G @ mean_weights, 0.0))
    if g0_norm == 0 or c == 0:  # the mean is the answer (also for J = 0)
        return torch.from_numpy(mean_weights)
    linear = G @ mean_weights  # J g₀
    radius = c * g0_norm

    def objective(w):
        return w @ linear + radius * np.sqrt(w @ G @ w + 1e-8)

    def gradient(w):
        return linear + radius * (G @ w) / np.sqrt(w @ G @ w + 1e-8)

    result = minimize(
        objective, mean_weights, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * num_tasks,
        constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones_like(w)},
        # SLSQP's ftol is absolute and the objective on the normalised G is only ~1e-4..1e-3: its default
        # 1e-6 stopped up to 2% away from the optimum (300 random cases: all converge at 1e-14, in ~40 iterations)
        options={"ftol": 1e-14, "maxiter": 500},
    )
    if not result.success or not np.isfinite(result.x).all():
        raise SolverError(f"SLSQP: {result.message}")
    w = np.clip(result.x, 0.0, None)
    gw_norm = np.sqrt(max(w @ G @ w, 0.0))
    return torch.from_numpy(mean_weights + (radius / gw_norm if gw_norm > 0 else 0.0) * w)


class CAGrad(WeightedAggregator):
    """Options: c (ball radius relative to ‖g₀‖), rescale 0: d, 1: d/(1+c²), 2: d/(1+c)."""

    name = "cagrad"
    defaults = {"c": 0.5, "rescale": 1}  # rescale=1 as in the authors' and LibMTL's code

    def _check_options(self, options):
        check_number(self.name, options, "c", 0.0)
        require(
            options["rescale"] in RESCALES,
            f"cagrad: rescale must be 0 (none), 1 (/(1+c²)) or 2 (/(1+c)), got {options['rescale']!r}",
        )

    def _weights(self, G, losses):
        c = float(self.options["c"])
        divisor = RESCALES[self.options["rescale"]](c)
        return solve_or_uniform(self.name, lambda: cagrad_weights(G, c) / divisor, len(G))
