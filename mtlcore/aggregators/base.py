"""What every aggregator shares: options, state, finiteness checks and the three base classes.

`GradientAggregator` maps the task Jacobian J (K×P) to an update d (P).
`WeightedAggregator` is TorchJD's split of it: J → Gramian G = J Jᵀ (`gramian.py`) → weights w = `weighting(G,
losses)` → d = Jᵀw, so a method only writes `_weights(G, losses)` on a small K×K float64 problem.
`LossAggregator` combines the K losses into one differentiable scalar.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlcore.aggregators.gramian import gramian

logger = logging.getLogger("mtlcore.aggregators")


class NonFiniteGradientError(FloatingPointError):
    """NaN or inf in the task gradients or losses: the run has diverged and should stop."""


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds (option and input validation)."""
    if not condition:
        raise ValueError(message)


def check_number(
    method: str, options: dict[str, Any], key: str,
    minimum: float | None = None, maximum: float | None = None, integer: bool = False,
) -> None:
    """Refuse an option that is not a finite number in [minimum, maximum] (an int if `integer`)."""
    value = options[key]
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        wanted = "an int" if integer else "a number"
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        wanted += "".join(f" {b}" for b in bounds if b)
        raise ValueError(f"{method}: option {key} must be {wanted}, got {value!r}")


LOW_PRECISION = (torch.float16, torch.bfloat16)  # summed in float32: their own sum overflows at 65504 (fp16)


def check_finite(method: str, tensor: Tensor | None, what: str) -> None:
    # One sum instead of an elementwise isfinite: NaN and ±inf propagate into it. Finite entries can only overflow it
    # when they are ~1e38 / numel in float32, and an update that large turns the parameters into inf at the next
    # step anyway.
    if tensor is None:
        return
    if tensor.requires_grad:  # detached only when needed: it runs every step
        tensor = tensor.detach()
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in LOW_PRECISION else tensor.sum()
    if not math.isfinite(total):
        raise diverged(method, what)


def diverged(method: str, what: str) -> NonFiniteGradientError:
    return NonFiniteGradientError(f"{method}: {what} contain NaN or inf; the run has diverged "
                                  "(lower the learning rate or clip gradients)")


def normalize_gramian(G: Tensor) -> tuple[Tensor, float]:
    """G / trace(G) and trace(G); scale-invariant methods solve on this to avoid tiny/huge numbers."""
    scale = float(G.trace())
    return (G / scale if scale > 0 else G), scale


def uniform_weights(num_tasks: int) -> Tensor:
    """The fallback of every solver that fails: the plain mean of the task gradients."""
    return torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)


class Aggregator:
    """Base of all aggregators; subclasses set `name`, `kind`, `defaults` and `_check_options`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    randomised: ClassVar[bool] = False  # takes a torch.Generator
    # Its draws are used on the host (PCGrad's and GradVac's orders of the tasks, RLW's K weights, which are recorded
    # there): a CPU generator serves it on any device, where one on a GPU costs a round trip for every draw.
    draws_on_host: ClassVar[bool] = False
    needs_losses_after: ClassVar[bool] = False  # call after_step(losses after the optimizer step)
    needs_last_shared: ClassVar[bool] = False  # pass combine(..., last_shared=params)
    # attribute names saved by state_dict(): tensors, numbers, or objects with state_dict()
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any):
        generator = options.pop("generator", None) if self.randomised else None
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown option(s) {unknown}; valid options (with defaults): "
                f"{self.describe_options()}"
            )
        self.options: dict[str, Any] = {**self.defaults, **options}
        self._check_options(self.options)
        self.generator: torch.Generator | None = generator
        self.num_tasks: int | None = None
        self.weights: Tensor = torch.empty(0, dtype=torch.float64)

    @classmethod
    def describe_options(cls) -> str:
        described = ", ".join(f"{key}={value!r}" for key, value in cls.defaults.items()) or "none"
        if cls.randomised:
            described += ", generator=None (torch.Generator)"
        return described

    def _check_options(self, options: dict[str, Any]) -> None:
        """Refuse bad option values with a ValueError naming the option and the valid range."""

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return f"{type(self).__name__}({options})"

    # --- state -------------------------------------------------------------------------------
    def reset(self, num_tasks: int, device: torch.device | str | None = None) -> None:
        """Forget all state and prepare for `num_tasks` tasks (learnable parameters on `device`)."""
        require(
            isinstance(num_tasks, int) and num_tasks >= 1,
            f"{self.name}: num_tasks must be a positive int, got {num_tasks!r}",
        )
        self.num_tasks = num_tasks
        self.weights = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        self._reset_state(num_tasks, torch.device(device) if device is not None else torch.device("cpu"))

    def _reset_state(self, num_tasks: int, device: torch.device) -> None:
        """Create the method's state for `num_tasks` tasks."""

    def _ensure_tasks(self, num_tasks: int) -> None:
        if self.num_tasks is None:
            self.reset(num_tasks)
        require(
            num_tasks == self.num_tasks,
            f"{self.name}: got {num_tasks} tasks but was reset for {self.num_tasks}; "
            "call reset(num_tasks) when the task set changes",
        )

    def parameters(self) -> list[Tensor]:
        """Learnable tensors to optimise together with the model (empty for most methods)."""
        return []

    def generator_device(self, device: torch.device | str) -> torch.device:
        """Where the generator of this method should live in a run on `device` (it only has one if `randomised`)."""
        return torch.device("cpu") if self.draws_on_host else torch.device(device)

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Source of randomness for randomised methods (ignored by deterministic ones)."""
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_tasks": self.num_tasks}
        for attribute in self.state_attributes:
            value = getattr(self, attribute, None)
            if hasattr(value, "state_dict"):  # e.g. an internal Adam; its state_dict shares tensors
                value = copy.deepcopy(value.state_dict())
            elif isinstance(value, Tensor):
                value = value.detach().clone()
            state[attribute] = value
        if self.generator is not None:  # a resumed randomised method continues its draws instead of restarting
            state["generator"] = {"device": self.generator.device.type, "state": self.generator.get_state()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("generator")
        if saved is not None and self.generator is not None:
            if saved["device"] == self.generator.device.type:
                self.generator.set_state(saved["state"])
            else:  # CPU and CUDA generators differ; such a run is not bit-identical to either anyway
                logger.warning("%s: state from a %s generator loaded on %s: the random draws restart from the seed",
                               self.name, saved["device"], self.generator.device.type)
        if state.get("num_tasks") is None:
            self.num_tasks = None
            return
        if self.num_tasks != state["num_tasks"]:
            self.reset(state["num_tasks"])
        for attribute in self.state_attributes:
            current, saved = getattr(self, attribute, None), state[attribute]
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(copy.deepcopy(saved))
            elif isinstance(current, Tensor) and isinstance(saved, Tensor) and current.shape == saved.shape:
                with torch.no_grad():  # in place, so optimisers keep pointing at the same tensor
                    current.copy_(saved)
            else:
                setattr(self, attribute, saved.clone() if isinstance(saved, Tensor) else saved)

    # --- hooks the trainer calls (no-ops unless a method needs them) ---------------------------
    def after_step(self, losses_after: Tensor) -> None:
        """Losses of the same batch after the optimizer step (FAMO); see `needs_losses_after`."""

    def end_epoch(self, epoch_mean_losses: Tensor) -> None:
        """Mean training loss of each task over the epoch that just ended (DWA)."""

    def _set_weights(self, weights: Tensor) -> None:
        # a copy: some methods keep the tensor they return (uniform, fixed)
        self.weights = weights.detach().to("cpu", torch.float64, copy=True)

    def _check_losses(self, losses: Tensor | None) -> None:
        if losses is None:
            return
        if losses.dim() != 1 or losses.numel() != self.num_tasks:
            raise ValueError(f"{self.name}: losses must be a vector of {self.num_tasks} task losses, "
                             f"got shape {tuple(losses.shape)}")
        check_finite(self.name, losses, "the losses")


class GradientAggregator(Aggregator):
    """`agg(J, losses=None) -> d`: J has one row per task (gradient of the shared parameters)."""

    kind = "gradient"
    jacobian_of: ClassVar[str] = "shared"  # or "representation" (MGDA-UB)
    needs_losses: ClassVar[bool] = False  # True (or a property) where the method reads the losses

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        self._check_jacobian(J)
        d, weights = self._aggregate(J, self._losses_read(losses))
        self._set_weights(weights)
        return d

    def _aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        """Return d and the weights w with d = Jᵀw (NaN-filled where the method has none). J is not scanned for
        NaN/inf: a method checks what shows them (G, d, or J itself)."""
        raise NotImplementedError

    def _check_jacobian(self, J: Tensor) -> None:
        # Called every step: messages are formatted only on failure.
        if J.dim() != 2 or not J.is_floating_point():
            raise ValueError(f"{self.name}: J must be a float matrix (tasks × parameters), got shape {tuple(J.shape)}")
        if J.shape[0] != self.num_tasks:
            self._ensure_tasks(J.shape[0])

    def _losses_read(self, losses: Tensor | None) -> Tensor | None:
        """The losses the method gets: checked and detached, or None for the methods that ignore them (the trainer
        checks every loss itself)."""
        if not self.needs_losses:
            return None
        if losses is None:
            raise ValueError(f"{self.name}: with options {self.options} the losses are needed: call agg(J, losses)")
        self._check_losses(losses)
        return losses.detach()

    def head_weights(self, losses: Tensor) -> Tensor:
        """Weights of each task's loss gradient on its own head under `head_update: weighted`: the last step's
        `weights`, or 1 where the method has none (GradDrop, as LibMTL's heads get ∇L_k)."""
        weights = self.weights.to(losses)
        return weights if torch.isfinite(weights).all() else torch.ones_like(losses)


class WeightedAggregator(GradientAggregator):
    """d = Jᵀw with w = `weighting(G, losses)` and G = J Jᵀ: subclasses write `_weights(G, losses)`."""

    def weighting(self, G: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights w (float64, CPU) for the Gramian G = J Jᵀ, and for the losses where the method reads them
        (`needs_losses`); also stored in `weights`. TorchJD's `Weighting`: a Gramian formed without J feeds the
        same code. NaN/inf in G raise NonFiniteGradientError; where a solver returns non-finite weights, a warning
        is logged and the uniform mean weights 1/K are used for this step."""
        if G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"{self.name}: G must be a square matrix (tasks × tasks), got shape {tuple(G.shape)}")
        self._ensure_tasks(G.shape[0])
        self._set_weights(self._weigh(G, self._losses_read(losses)))
        return self.weights.clone()

    def weights_from(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        """`weighting(J Jᵀ, losses)`: the weights w for J; the trainer applies Σ w_k g_k."""
        self._check_jacobian(J)
        return self.weighting(gramian(J), losses)

    def _aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        weights = self._weigh(gramian(J), losses)
        return torch.mv(J.T, weights.to(J)), weights

    def _weigh(self, G: Tensor, losses: Tensor | None) -> Tensor:
        G = G.to("cpu", torch.float64)
        if not torch.isfinite(G).all():
            raise diverged(self.name, "the task gradients J")
        weights = self._weights(G, None if losses is None else losses.to("cpu", torch.float64))
        if not torch.isfinite(weights).all():  # safety net; the solvers are not expected to get here
            logger.warning("%s: non-finite weights %s; using uniform weights 1/K for this step", self.name, weights)
            weights = uniform_weights(len(G))
        return weights

    def _weights(self, G: Tensor, losses: Tensor | None) -> Tensor:
        """The method's weights (float64 K) for the float64 CPU Gramian G (and float64 CPU losses, or None)."""
        raise NotImplementedError


class LossAggregator(Aggregator):
    """`agg.combine(losses) -> scalar` to call backward on; `agg.weights` holds the weights used."""

    kind = "loss"

    def combine(self, losses: Tensor, last_shared: list[Tensor] | None = None) -> Tensor:
        require(
            losses.dim() == 1,
            f"{self.name}: losses must be a vector of task losses, got shape {tuple(losses.shape)}",
        )
        self._ensure_tasks(losses.numel())
        self._check_losses(losses)
        total, weights = self._combine(losses, last_shared)
        self._set_weights(weights)
        return total

    def _combine(self, losses: Tensor, last_shared: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        """Return the scalar to differentiate and the effective weight of each task's loss gradient."""
        raise NotImplementedError

    def preview_weights(self, losses: Tensor) -> Tensor:
        """The effective weights a step with these losses would apply (the update direction of Eq. 6 is Σ w_k g_k).
        Computed by `combine`, so a method that draws (RLW) draws from its generator: call it on a copy to leave a
        run's state untouched."""
        self.combine(losses.detach())
        return self.weights.clone()

    def _weighted_sum(self, losses: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        weights = weights.detach()
        return (weights.to(losses) * losses).sum(), weights
