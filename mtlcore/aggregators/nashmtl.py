"""Nash-MTL (Navon et al. 2022): the bargaining solution α > 0 with Gα = 1/α, d = Jᵀα clipped."""
from __future__ import annotations

import math

import numpy as np
import torch

from mtlcore.aggregators._qp import SolverError
from mtlcore.aggregators.base import WeightedAggregator, check_number, logger


def nash_weights(G: np.ndarray, start: np.ndarray, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray:
    """α > 0 with Gα = 1/α, by damped Newton on the convex f(α) = ½αᵀGα − Σ log α.

    Solved on Ĝ = G/‖G‖_F (α̂ = α·√‖G‖_F) so the numbers stay O(1); like the authors' CCP
    (whose constraint α_i(Gα)_i ≥ 1 uses the unnormalised G), the answer is for the raw G,
    hence ‖Jᵀα‖ = √K before clipping. `start` warm-starts from the previous step's α.
    Raises SolverError when f has no minimiser (e.g. some v ≥ 0 with Jᵀv = 0).
    """
    scale = float(np.linalg.norm(G))
    if scale == 0:
        raise SolverError("all task gradients are zero")
    G = G / scale

    def f(a):
        return 0.5 * a @ G @ a - np.log(a).sum()

    # the warm start, unless the diagonal solution 1/√Ĝ_ii (exact for orthogonal gradients) is better
    diagonal = np.diag(G)
    candidates = [np.where(start > 0, start, 1.0) * math.sqrt(scale), np.where(diagonal > 0, diagonal, 1.0) ** -0.5]
    alpha = min(candidates, key=f)

    for _ in range(max_iter):
        residual = alpha * (G @ alpha) - 1.0  # scale-free form of Gα − 1/α
        if np.abs(residual).max() < tol:
            return alpha / math.sqrt(scale)
        gradient = G @ alpha - 1.0 / alpha
        step = np.linalg.solve(G + np.diag(1.0 / alpha**2), gradient)
        t = 1.0
        while np.any(alpha - t * step <= 0):  # stay in α > 0
            t *= 0.5
        # Armijo only while the Newton decrement λ² = gradientᵀstep is large: f is self-concordant, so below
        # λ² = 0.01 full steps converge quadratically, and there f's decrease (~λ²) soon falls under its rounding,
        # which made the line search take tiny steps and stall at residuals ~1e-8 in 1-3% of random cases.
        if gradient @ step > 0.01:
            while f(alpha - t * step) > f(alpha) - 1e-4 * t * (gradient @ step) and t > 1e-12:
                t *= 0.5
        alpha = alpha - t * step
        if not np.isfinite(alpha).all():
            break
    raise SolverError(f"Newton did not reach Gα = 1/α in {max_iter} iterations")


class NashMTL(WeightedAggregator):
    """Weights α (solving Gα = 1/α) scaled so that ‖d‖ ≤ max_norm (0 disables the clip).

    `alpha` holds the unclipped solution. Weights are recomputed every `update_weights_every`
    calls and reused in between. When Newton fails, the previous α is kept (ones at the start),
    as the authors' code does, and a warning is logged.
    """

    name = "nashmtl"
    defaults = {"max_norm": 1.0, "update_weights_every": 1, "max_iter": 100}
    state_attributes = ("alpha", "step")

    def _check_options(self, options):
        check_number(self.name, options, "max_norm", 0.0)  # 0 disables clipping
        check_number(self.name, options, "update_weights_every", 1, integer=True)
        check_number(self.name, options, "max_iter", 1, integer=True)

    def _reset_state(self, num_tasks, device):
        self.alpha = torch.ones(num_tasks, dtype=torch.float64)
        self.step = 0

    def _weights(self, G, losses):
        if self.step % self.options["update_weights_every"] == 0:
            try:
                self.alpha = torch.from_numpy(nash_weights(G, self.alpha.numpy(), self.options["max_iter"]))
            except (SolverError, np.linalg.LinAlgError) as error:
                logger.warning("nashmtl: solver failed (%s); keeping the previous weights", error)
        self.step += 1
        alpha = self.alpha.numpy()
        norm = math.sqrt(max(alpha @ G @ alpha, 0.0))  # ‖Jᵀα‖
        max_norm = self.options["max_norm"]
        return alpha * (max_norm / norm) if max_norm > 0 and norm > max_norm else alpha.copy()
