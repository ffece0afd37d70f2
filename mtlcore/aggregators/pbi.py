"""Penalty-based boundary intersection (PBI; Zhang & Li 2007, MOEA/D) as a scalarisation of the task losses."""
from __future__ import annotations

import torch

from mtlcore.aggregators.base import LossAggregator, check_number, require


class PBI(LossAggregator):
    """combine = d₁ + θ d₂ for the preference p (unit p̂ = p/‖p‖) and the ideal point 0 (losses are ≥ 0):
    d₁ = p̂ᵀL, the distance along p̂, and d₂ = ‖L − d₁ p̂‖, the distance from the preference ray.

    PBI is positively homogeneous in L, so combine = Σ w_k L_k with its gradient w = p̂ + θ r/‖r‖ (r = L − d₁p̂;
    p̂ alone on the ray, where d₂ has no gradient); `weights` holds w, which may be negative (a loss far above
    its share is pushed down, one below it is let up). `preference`: K positive numbers (None: equal ones).
    """

    name = "pbi"
    defaults = {"preference": None, "theta": 5.0}  # θ = 5, MOEA/D's value

    def _check_options(self, options):
        check_number(self.name, options, "theta", 0.0)
        preference = options["preference"]
        if preference is not None:
            ok = isinstance(preference, (list, tuple)) and len(preference) > 0 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v != float("inf")
                for v in preference)
            require(ok, f"pbi: preference must be None or a list of positive finite numbers, got {preference!r}")
            options["preference"] = [float(v) for v in preference]

    def _reset_state(self, num_tasks, device):
        preference = self.options["preference"]
        require(
            preference is None or len(preference) == num_tasks,
            f"pbi: preference has {0 if preference is None else len(preference)} entries for {num_tasks} tasks",
        )

    def direction_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """w = ∂PBI/∂L at `losses` (float64)."""
        losses = losses.detach().to("cpu", torch.float64)
        preference = self.options["preference"]
        p = torch.ones_like(losses) if preference is None else torch.tensor(preference, dtype=torch.float64)
        p = p / p.norm()
        residual = losses - (p @ losses) * p
        norm = residual.norm()
        # on the ray (up to rounding of d₁p̂) r has no direction: take d₂'s subgradient 0 there
        return p + self.options["theta"] * residual / norm if norm > 1e-12 * losses.norm() else p

    def _combine(self, losses, last_shared):
        return self._weighted_sum(losses, self.direction_weights(losses))
