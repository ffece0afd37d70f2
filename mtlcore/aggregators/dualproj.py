"""DualProj (TorchJD): the mean gradient projected onto the dual cone {x : Jx ≥ 0}."""
from __future__ import annotations

from mtlcore.aggregators._qp import project_weights_to_dual_cone, solve_or_uniform
from mtlcore.aggregators.base import uniform_weights
from mtlcore.aggregators.upgrad import DualConeAggregator, regularized_gramian


class DualProj(DualConeAggregator):
    name = "dualproj"

    def _weights(self, G, losses):
        num_tasks = len(G)
        G = regularized_gramian(G, self.options["reg_eps"])
        mean = uniform_weights(num_tasks)
        return solve_or_uniform(self.name, lambda: project_weights_to_dual_cone(mean, G), num_tasks)
