"""Worst-case elementwise-adaptive ℓ∞ m-sharpness (Andriushchenko et al. 2023; paper A, Eq. 3).

S = mean over batches B of max_{|ε| ≤ ρ|w| elementwise} [L^B(w + ε) − L^B(w)], w = the parameters the
task's loss depends on (encoder + the task's head). The inner maximum is approximated as in the
reference implementation (tml-epfl/sharpness-vs-generalization, `eval_APGD_sharpness`, linf, adaptive):
sign-gradient ascent with step 2ρ|w|, projection by clipping, momentum, the worst loss seen kept, and
the step halved at checkpoints where progress stalls. The loss is evaluated through
`torch.func.functional_call` on w + ε, so the model's own parameters are never modified.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mtlcore.metrics.common import check_examples, evaluation_mode, model_device, task_named_parameters
from mtlcore.settings.base import Loss, take, to_device

logger = logging.getLogger(__name__)


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
    """The reference's "default" step-halving checkpoints for `steps` iterations (0-based indices).

    Gaps start at 22% of the run and shrink by 3% down to 6% (as in APGD); for 20 steps this gives
    (5, 9, 12, 15, 16, 18, 19). The float arithmetic is the reference's, so the rounding matches too.
    """
    fractions, checkpoints = [0, 0.22], [0, math.ceil(steps * 0.22)]
    while checkpoints[-1] < steps and checkpoints[-1] != checkpoints[-2]:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        checkpoints.append(math.ceil(fractions[-1] * steps))
    return tuple(c for c in checkpoints[1:] if c < steps)


@dataclass(frozen=True)
class WorstCasePerturbation:
    clean_loss: float
    worst_loss: float
    perturbation: dict[str, torch.Tensor]  # ε at the worst loss seen, name → tensor like the parameter


def _loss_at(model, task, parameters, perturbation, x, y, loss: Loss) -> torch.Tensor:
    shifted = {name: parameters[name] + perturbation[name] for name in parameters}
    return loss.mean(functional_call(model, shifted, (x, task)), y)


def _uniform_like(tensor: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in [-1, 1], drawn on the generator's device so a CPU generator also works for CUDA models."""
    device = tensor.device if generator is None else generator.device
    return (2 * torch.rand(tensor.shape, generator=generator, device=device, dtype=tensor.dtype) - 1).to(tensor.device)


def worst_case_perturbation(
    model: nn.Module,
    task: str,
    x,
    y,
    *,
    loss: Loss,
    rho: float = 1e-3,
    steps: int = 20,
    step_size: float | None = None,
    momentum: float = 0.75,
    halving_checkpoints: tuple[int, ...] | None = None,
    min_update_ratio: float = 0.75,
    random_init: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> WorstCasePerturbation:
    """Maximise L(w + ε) over |ε| ≤ ρ|w| on one batch (x, y) of the task's `loss`, in eval mode (restored after).

    step_size: the ascent step relative to |w| (None → 2ρ, the reference's). Momentum as in the
    reference: ε_{k+1} = momentum·z_{k+1} + (1 − momentum)·ε_{k−1}, z_{k+1} = clip(ε_k + step·|w|·sign ∇),
    a convex combination of feasible points, hence feasible. At a checkpoint the step is halved when
    fewer than `min_update_ratio` of the iterations since the last checkpoint improved the worst loss,
    or when neither the step nor the worst loss changed since then; the next ascent direction is then the
    gradient sign at the worst ε, while ε and the previous ε go on (as the reference, which reloads the worst
    weights but keeps its ε; results version 9, before which ε restarted from the worst one).
    random_init: start from ε uniform in the box (the reference's default is ε = 0).
    halving_checkpoints: 0-based iterations after which to check; None → `apgd_checkpoints(steps)`.
    """
    if rho < 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if halving_checkpoints is None:
        halving_checkpoints = apgd_checkpoints(steps)
    device = model_device(model, device)
    x, y = to_device(x, device), to_device(y, device)
    parameters = {name: p.detach() for name, p in task_named_parameters(model, task).items()}
    radius = {name: rho * w.abs() for name, w in parameters.items()}
    zeros = {name: torch.zeros_like(w) for name, w in parameters.items()}
    delta = {name: _uniform_like(r, generator) * r for name, r in radius.items()} if random_init else zeros
    previous_delta = {name: d.clone() for name, d in delta.items()}
    step = 2 * rho if step_size is None else step_size

    def loss_and_gradients(perturbation, with_gradients=True):
        # One forward/backward per iteration: the gradient at ε_{k+1} is taken with its loss.
        if not with_gradients:
            with torch.no_grad():
                return _loss_at(model, task, parameters, perturbation, x, y, loss).item(), None
        variables = {name: d.clone().requires_grad_(True) for name, d in perturbation.items()}
        batch_loss = _loss_at(model, task, parameters, variables, x, y, loss)
        gradients = torch.autograd.grad(batch_loss, list(variables.values()), allow_unused=True)
        # A parameter the loss does not reach gets no push (sign 0).
        return batch_loss.item(), {
            name: torch.zeros_like(d) if g is None else g.sign() for (name, d), g in zip(variables.items(), gradients)
        }

    with evaluation_mode(model):
        worst_loss, directions = loss_and_gradients(delta, with_gradients=steps > 0)
        worst_delta, worst_directions = delta, directions
        clean_loss = worst_loss
        if random_init:  # the clean point is the first worst, as in the reference, so the result is never < 0
            clean_loss, clean_directions = loss_and_gradients(zeros, with_gradients=steps > 0)
            if clean_loss >= worst_loss:
                worst_loss, worst_delta, worst_directions = clean_loss, zeros, clean_directions
        improvements, last_checkpoint, loss_at_checkpoint, step_at_checkpoint = 0, 0, worst_loss, step

        for iteration in range(steps):
            with torch.no_grad():
                new_delta = {}
                for name, d in delta.items():
                    ascended = d + step * parameters[name].abs() * directions[name]
                    projected = torch.maximum(torch.minimum(ascended, radius[name]), -radius[name])
                    new_delta[name] = momentum * projected + (1 - momentum) * previous_delta[name]
                previous_delta, delta = delta, new_delta
            current_loss, directions = loss_and_gradients(delta, with_gradients=iteration < steps - 1)
            if current_loss > worst_loss:
                worst_loss, worst_delta, worst_directions = current_loss, delta, directions
                improvements += 1
            if iteration in halving_checkpoints:
                too_few_improvements = improvements < min_update_ratio * (iteration - last_checkpoint)
                stalled = step == step_at_checkpoint and worst_loss == loss_at_checkpoint
                step_at_checkpoint, loss_at_checkpoint, last_checkpoint, improvements = step, worst_loss, iteration, 0
                if too_few_improvements or stalled:
                    step /= 2
                    # As the reference: it reloads the worst weights, so the next gradient sign is taken there,
                    # but the ascent goes on from its current ε and previous ε.
                    directions = worst_directions
        return WorstCasePerturbation(clean_loss, worst_loss, worst_delta)


def sharpness(
    model: nn.Module,
    task: str,
    x,
    y,
    *,
    loss: Loss,
    rho: float = 1e-3,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **ascent_options,
) -> float:
    """Mean over consecutive batches of (worst loss − clean loss), each batch maximised independently.

    Eval mode (restored afterwards); a last partial batch counts as one batch. `ascent_options`
    (steps, step_size, momentum, halving_checkpoints, min_update_ratio, random_init) go to
    `worst_case_perturbation`.
    """
    n = check_examples(x, y)
    increases = []
    for start in tqdm(range(0, n, batch_size), desc=f"sharpness {task}", disable=not progress, leave=False):
        batch = slice(start, start + batch_size)
        result = worst_case_perturbation(
            model, task, take(x, batch), take(y, batch), rho=rho, loss=loss, generator=generator, device=device,
            **ascent_options
        )
        increases.append(result.worst_loss - result.clean_loss)
    logger.debug("sharpness of %s per batch: %s", task, increases)
    return sum(increases) / len(increases)
