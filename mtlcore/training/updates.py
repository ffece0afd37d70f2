"""Update rules: how one step's K task losses become the parameters' gradients.

Three kinds, one interface. `apply(step)` sets every parameter's `.grad` and returns the K task weights applied
to the shared parameters; `direction()` returns the update the rule applies as a function of (J, losses), for
the gradient conflict of Eq. 6 (it never changes the rule's state). The trainer calls only these methods.

* `UniformUpdate`: one backward of (1/C) Σ_k L_k (paper A, Eq. 2).
* `LossLevelUpdate`: a loss-level method combines the losses into one scalar (GradNorm, uncertainty, DWA, ...).
* `JacobianUpdate`: a gradient-level method maps the task Jacobian J of the shared parameters (or of the shared
  features, for MGDA-UB) to the update (MGDA, PCGrad, CAGrad, ...).

Heads get their own task's loss gradient, unweighted (`head_update: own`), or weighted as the method weighs it
("weighted").

More than one batch per step: the trainer gives every rule, once, a batch source (`set_batch_source(draw)`): `draw()`
draws the run's next batch from its seeded, checkpointed samplers and returns that batch's `Step`, its losses'
graphs included. A method with `batches_per_step` > 1 (MoDo, SDMGrad: independent batches for an unbiased product
of Jacobians) gets, from `JacobianUpdate`, the step's own Jacobian and those of `batches_per_step` − 1 batches drawn
from it; every other rule ignores the source. So an epoch of such a method draws `batches_per_step` times the
batches of the others, in the same number of steps, and a killed run resumes bit for bit (the samplers are in the
checkpoint).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtlcore import aggregators
from mtlcore._seeding import torch_generator
from mtlcore.aggregators import set_grad, task_jacobian, unflatten_into_grads
from mtlcore.settings.base import MultiTaskModel

Direction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """One step's task losses: stacked (K,), as the K scalars they were computed as, and the shared features (None
    where each task's batch had a forward of its own)."""

    losses: torch.Tensor
    parts: list[torch.Tensor]
    features: torch.Tensor | None


class Update:
    """The interface; the no-op hooks are for rules without state.

    `per_task_graphs`: the rule differentiates each task's loss on its own (the rows of J), which is cheaper from one
    graph per task's batch; the trainer builds them so where that is the same function as one joint forward.
    """

    per_task_graphs = False

    def __init__(self, model: MultiTaskModel, tasks: list[str], scale: float, head_update: str):
        self.model, self.tasks, self.scale, self.own_heads = model, tasks, scale, head_update == "own"
        self.draw: Callable[[], Step] | None = None

    def apply(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def direction(self) -> Direction:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        """Learnable tensors of the rule, optimised with the model (the log-variances of uncertainty weighting)."""
        return []

    def after_step(self, losses_after: Callable[[], torch.Tensor]) -> None:
        """Called after the optimizer step with a function giving the same batch's losses (FAMO learns from them)."""

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """The epoch's mean training loss of each task (DWA's history)."""

    def set_batch_source(self, draw: Callable[[], Step]) -> None:
        """Called once by the trainer: `draw()` returns the Step of the run's next batch. Kept for the methods that need
        more than one batch per step (`batches_per_step` > 1); no rule draws from it otherwise."""
        self.draw = draw

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

    def final_state(self) -> dict:
        """What a finished run records of the rule's state (no generator bytes)."""
        return {}

    def _heads(self) -> list[torch.nn.Parameter]:
        return [p for task in self.tasks for p in self.model.task_parameters(task)]

    def _set_head_grads(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        heads = self._heads()
        for p, g in zip(heads, torch.autograd.grad((weights * losses).sum(), heads)):
            set_grad(p, g)


class UniformUpdate(Update):
    """(1/C) Σ_k L_k in one backward; C = 1 (`loss_scale: sum`) or K ("mean")."""

    def apply(self, step: Step) -> torch.Tensor:
        (step.losses.sum() / self.scale).backward()
        if self.own_heads and self.scale != 1.0:  # each head gets its own loss's gradient, unscaled
            for p in self._heads():
                p.grad.mul_(self.scale)
        return torch.full((len(self.tasks),), 1.0 / self.scale)

    def direction(self) -> Direction:
        scale = self.scale
        return lambda jacobian, losses: jacobian.sum(0) / scale


class _MethodUpdate(Update):
    """A rule driven by an aggregator (`mtlcore.aggregators`), whose state it checkpoints."""

    def __init__(self, aggregator, model, tasks, scale, head_update):
        super().__init__(model, tasks, scale, head_update)
        self.aggregator = aggregator

    def parameters(self) -> list[torch.Tensor]:
        return list(self.aggregator.parameters())

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        self.aggregator.end_epoch(mean_losses)

    def state_dict(self) -> Any:
        return self.aggregator.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.aggregator.load_state_dict(state)

    def final_state(self) -> dict:
        state = self.aggregator.state_dict()
        state.pop("generator", None)  # RNG bytes for resuming (in the checkpoint), not a result
        return state



class LossLevelUpdate(_MethodUpdate):
    def apply(self, step: Step) -> torch.Tensor:
        agg = self.aggregator
        last = self.model.last_shared_layer() if agg.needs_last_shared else None
        agg.combine(step.losses, last_shared=last).backward(retain_graph=self.own_heads)
        if self.own_heads:
            self._set_head_grads(step.losses, torch.ones_like(step.losses))
        return agg.weights.to(torch.float64)

    def after_step(self, losses_after: Callable[[], torch.Tensor]) -> None:
        if self.aggregator.needs_losses_after:
            with torch.no_grad():
                self.aggregator.after_step(losses_after())

    def direction(self) -> Direction:
        """Σ_k w_k g_k with the weights the method would give these losses now (a copy of it computes them, so the
        run's state and random draws are untouched)."""
        frozen = copy.deepcopy(self.aggregator)
        return lambda jacobian, losses: frozen.preview_weights(losses).to(jacobian) @ jacobian


class JacobianUpdate(_MethodUpdate):
    @property
    def per_task_graphs(self) -> bool:
        return self.aggregator.jacobian_of == "shared"  # MGDA-UB differentiates the joint features instead

    def apply(self, step: Step) -> torch.Tensor:
        agg, losses = self.aggregator, step.losses
        shared = self.model.shared_parameters()
        if agg.jacobian_of == "representation":  # MGDA-UB: weights from the gradients w.r.t. the shared features
            w = agg.weights_from(task_jacobian(losses, [step.features]), losses.detach())
            grads = torch.autograd.grad((w.to(losses) * losses).sum(), shared, retain_graph=True)
            for p, g in zip(shared, grads):
                set_grad(p, g)
        elif getattr(agg, "batches_per_step", 1) > 1:  # MoDo, SDMGrad: this batch's J and independent ones'
            draw = self.draw
            if draw is None:
                raise ValueError(f"{agg.name} needs {agg.batches_per_step} batches per step: give the update rule a "
                                 "batch source with set_batch_source(draw)")
            extra = [draw() for _ in range(agg.batches_per_step - 1)]
            jacobians = [task_jacobian(s.parts, shared, method="loop", retain_graph=s is step)
                         for s in (step, *extra)]
            unflatten_into_grads(agg.aggregate_batches(jacobians, [s.losses.detach() for s in (step, *extra)]), shared)
        else:
            jacobian = task_jacobian(step.parts, shared, method="loop")
            unflatten_into_grads(agg(jacobian, losses.detach()), shared)
        head_weights = torch.ones_like(losses) if self.own_heads else agg.head_weights(losses.detach())
        self._set_head_grads(losses, head_weights)
        return agg.weights.to(torch.float64)

    def direction(self) -> Direction:
        # MGDA-UB: its last step's weights on the shared parameters; MoDo, SDMGrad: their last weights (J of one
        # batch cannot update them)
        if self.aggregator.jacobian_of == "representation" or getattr(self.aggregator, "batches_per_step", 1) > 1:
            weights = self.aggregator.weights.clone()
            return lambda jacobian, losses: weights.to(jacobian) @ jacobian
        frozen = copy.deepcopy(self.aggregator)  # measuring leaves the run's aggregator and its state untouched
        return lambda jacobian, losses: frozen(jacobian, losses)


def make_update(name: str, options: dict, model: MultiTaskModel, tasks: list[str], *, loss_scale: str,
                head_update: str, seed: int, device: torch.device) -> Update:
    """The update rule of a run: `uniform` without options is the one-backward `UniformUpdate`; every other name
    is the aggregator of that name (a randomised one seeded by (seed, "aggregator"))."""
    scale = 1.0 if loss_scale == "sum" else float(len(tasks))
    if name == "uniform" and not options:
        return UniformUpdate(model, tasks, scale, head_update)
    aggregator = aggregators.get(name, **options)
    aggregator.reset(len(tasks), device)
    if aggregator.randomised:
        aggregator.set_generator(torch_generator(seed, "aggregator", device=aggregator.generator_device(device)))
    kind = LossLevelUpdate if aggregator.kind == "loss" else JacobianUpdate
    return kind(aggregator, model, tasks, scale, head_update)
