"""FairGrad (Ban & Ji 2024): α-fair resource allocation among the tasks, d = Jᵀw with Gw = w^{−1/α}."""
from __future__ import annotations

import torch
from torch import Tensor

from mtlcore.aggregators._qp import SolverError, solve_or_uniform
from mtlcore.aggregators.base import WeightedAggregator, check_number, require


def fairgrad_weights(G: Tensor, alpha: float, max_iter: int = 100, tol: float = 1e-10) -> Tensor:
    """w > 0 with Gw = w^{−1/α} (Algorithm 1), by damped Newton on the convex f(w) = ½wᵀGw − Σ h(w_i), with
    h' = w^{−1/α} (h = log w at α = 1: Nash-MTL's bargaining system).

    Solved on Ĝ = G/‖G‖_F: if Ĝŵ = ŵ^{−1/α}, then w = ŵ·‖G‖_F^{−α/(1+α)} solves the raw system. The authors'
    and LibMTL's code minimise ‖Gw − w^{−1/α}‖² with scipy's least_squares from 1/K (it stops at its own
    tolerance); Newton reaches the residual `tol` of the scale-free form w^{1/α}(Ĝw) − 1. Raises SolverError
    where f has no minimiser (some v ≥ 0 with Jᵀv = 0, α ≥ 1) or Newton does not converge.
    """
    scale = float(G.norm())
    if scale == 0:
        raise SolverError("all task gradients are zero")
    G = G / scale
    power = 1.0 / alpha

    def f(w):
        h = w.log() if alpha == 1 else w ** (1 - power) / (1 - power)
        return float(0.5 * w @ G @ w - h.sum())

    diagonal = G.diagonal()
    w = torch.where(diagonal > 0, diagonal, 1.0) ** (-alpha / (1 + alpha))  # exact for orthogonal gradients
    for _ in range(max_iter):
        if (w ** power * (G @ w) - 1.0).abs().max() < tol:
            return w * scale ** (-alpha / (1 + alpha))
        gradient = G @ w - w ** -power
        step = torch.linalg.solve(G + torch.diag(power * w ** (-power - 1)), gradient)
        t = 1.0
        while (w - t * step <= 0).any():  # stay in w > 0
            t *= 0.5
        decrement = float(gradient @ step)
        if decrement > 0.01:  # Armijo while far; full steps converge quadratically close to the minimiser
            while f(w - t * step) > f(w) - 1e-4 * t * decrement and t > 1e-12:
                t *= 0.5
        w = w - t * step
        if not torch.isfinite(w).all():
            break
    raise SolverError(f"Newton did not reach Gw = w^(-1/alpha) in {max_iter} iterations")


class FairGrad(WeightedAggregator):
    """α-fairness: α = 1 proportional fairness (Nash-MTL's weights, unclipped), α → ∞ max-min fairness, α → 0
    the plain sum. When Newton fails, a warning is logged and the mean weights 1/K are used for the step."""

    name = "fairgrad"
    defaults = {"alpha": 1.0, "max_iter": 100}  # LibMTL's FairGrad_alpha

    def _check_options(self, options):
        check_number(self.name, options, "alpha", 0.0)
        require(options["alpha"] > 0, f"fairgrad: option alpha must be a number > 0, got {options['alpha']!r}")
        check_number(self.name, options, "max_iter", 1, integer=True)

    def _weights(self, G, losses):
        alpha, max_iter = float(self.options["alpha"]), self.options["max_iter"]
        return solve_or_uniform(self.name, lambda: fairgrad_weights(G, alpha, max_iter), len(G))
