"""CR-MOGM (Zhou et al. 2022): a correlation-reduced weighting, the EMA of another method's weights."""
from __future__ import annotations

from typing import Any

import torch

from mtlcore.aggregators.base import WeightedAggregator, check_number, require


class CRMOGM(WeightedAggregator):
    """λ_t = α λ_{t−1} + (1 − α) λ̂_t, λ̂_t the weights of the `base` method (any Gramian weighting: mgda, pcgrad,
    cagrad, ...; built as get(base, **base_options)), λ₀ = λ̂₁ (TorchJD's choice: the first step is the base's);
    d = Jᵀλ_t. α = 0: the base method itself; α = 1: its first weights forever. The paper's Corollary 1 lets α_t
    grow towards 1 as the learning rate decays; a fixed α (TorchJD's default 0.9) here. λ, and the base's state
    (its generator for pcgrad), are state."""

    name = "cr_mogm"
    defaults = {"base": "mgda", "base_options": {}, "alpha": 0.9}
    state_attributes = ("smoothed",)

    def __init__(self, **options: Any):
        from mtlcore.aggregators import get  # the registry imports this module

        base, base_options = options.get("base", "mgda"), options.get("base_options", {})
        require(isinstance(base_options, dict), f"cr_mogm: base_options must be a dict, got {base_options!r}")
        require(base != self.name, "cr_mogm: base must be another method than cr_mogm")
        self.base = get(base, **base_options)
        require(
            isinstance(self.base, WeightedAggregator) and self.base.jacobian_of == "shared",
            f"cr_mogm: base must be a method that weighs the Gramian of the shared parameters' J, got {base!r}",
        )
        self.randomised, self.draws_on_host = self.base.randomised, self.base.draws_on_host
        # the base's options with its defaults filled in: spelling a default out names the same run
        super().__init__(**{**options, "base_options": dict(self.base.options)})
        if self.generator is not None:
            self.base.set_generator(self.generator)

    def _check_options(self, options):
        check_number(self.name, options, "alpha", 0.0, 1.0)

    def set_generator(self, generator):
        self.generator = generator
        self.base.set_generator(generator)

    def _reset_state(self, num_tasks, device):
        self.base.reset(num_tasks, device)
        self.smoothed: torch.Tensor | None = None

    def _weights(self, G, losses):
        current = self.base.weighting(G, losses)
        alpha = self.options["alpha"]
        self.smoothed = current if self.smoothed is None else alpha * self.smoothed + (1 - alpha) * current
        return self.smoothed.clone()

    @property
    def needs_losses(self):
        return self.base.needs_losses

    def state_dict(self):
        state = super().state_dict()  # with the generator, which the base shares
        state["base"] = self.base.state_dict()
        state["base"].pop("generator", None)  # once is enough, and a finished run's record drops the top-level one
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.base.load_state_dict(state["base"])
