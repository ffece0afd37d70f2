"""What every aggregator shares: options, state, finiteness checks and the three base classes.

`GradientAggregator` maps the task Jacobian J (K×P) to an update d (P).
`WeightedAggregator` is the TorchJD split of it: J → Gramian G = J Jᵀ → weights w → d = Jᵀw,
so a method only writes `_weights(G, losses)` on a small K×K float64 problem.
`LossAggregator` combines the K losses into one differentiable scalar.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlcore._cpu_kernels import build
from mtlcore.aggregators import gramian_gpu

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
    # One sum instead of an elementwise isfinite (6 µs against 140 µs for a LeNet-sized vector): NaN and ±inf
    # propagate into it. Finite entries can only overflow it when they are ~1e38 / numel in float32, and an
    # update that large turns the parameters into inf at the next step anyway.
    if tensor is None:
        return
    if tensor.requires_grad:  # detach only when needed: it costs a quarter of the check on a LeNet-sized vector
        tensor = tensor.detach()
    total = tensor.sum(dtype=torch.float32) if tensor.dtype in LOW_PRECISION else tensor.sum()
    if not math.isfinite(total):
        raise diverged(method, what)


def diverged(method: str, what: str) -> NonFiniteGradientError:
    return NonFiniteGradientError(f"{method}: {what} contain NaN or inf; the run has diverged "
                                  "(lower the learning rate or clip gradients)")


# Entries of J converted to float64 at a time (K × columns) where the AVX2 kernel is not used: ~2 MB blocks stay in
# the CPU's cache, which made the Gramian of a 20 × 11M J 2× faster than 1M-column blocks.
GRAMIAN_BLOCK = 1 << 18
GRAMIAN_BLOCK_GPU = 1 << 22  # on a GPU launches cost more than cache misses: 32 MB float64 blocks

JACOBIAN_EXTENSION = "mtlcore_jacobian_cpu"
_JACOBIAN_SOURCE = Path(__file__).with_name("jacobian_cpu.cpp")  # built once: the lookup runs every step


def jacobian_extension():
    """The AVX2 kernels for G = J Jᵀ and d = Jᵀw (jacobian_cpu.cpp), or None where they cannot be built (logged
    once)."""
    return build(JACOBIAN_EXTENSION, _JACOBIAN_SOURCE, "MTLCORE_JACOBIAN_KERNELS",
                 "the CPU kernels for J Jᵀ and Jᵀw", "using numpy's and torch's products (the float64 Gramian about "
                 "2x slower on a large J)", logger)


def jacobian_kernels(device: torch.device | str = "cpu", num_tasks: int = 1, num_columns: int = 1) -> str:
    """What forms G (and on the CPU d) for a run's J (num_tasks × num_columns) on `device`: recorded with every run
    (the sums are rounded in another order). On a GPU the Triton kernel is compiled and run here on a small J of
    the same specialisation, so a kernel that cannot be compiled is recorded as "torch", the fallback the run
    then takes."""
    if torch.device(device).type == "cpu":
        return "fused-avx2" if jacobian_extension() is not None else "blas"
    return "triton" if gramian_gpu.probe(device, num_tasks, num_columns) else "torch"


def _kernel_for(J: Tensor):
    """The AVX2 kernels where they apply to J (a float32 CPU matrix with contiguous rows that records no gradient:
    their outputs are not differentiable), else None."""
    if (J.device.type == "cpu" and J.dtype == torch.float32 and (J.stride(1) == 1 or J.shape[1] <= 1)
            and not (J.requires_grad and torch.is_grad_enabled())):
        return jacobian_extension()
    return None


def gramian(J: Tensor) -> np.ndarray:
    """G = J Jᵀ in float64 on the CPU: exact products for float32 J and safe from overflow up to |J| ~ 1e150.

    A float32 J on the CPU goes to the AVX2 kernel (jacobian_cpu.cpp), which converts it to float64 a cache-sized
    tile at a time, and a J on a GPU to the Triton kernel (gramian_gpu.py), which does so in registers. Elsewhere
    G is accumulated over column blocks, so the float64 copy never exceeds GRAMIAN_BLOCK (GPU: GRAMIAN_BLOCK_GPU)
    entries (a full float64 copy of a large J would double its memory). Non-finite
    entries of J show up as non-finite entries of G (on its diagonal at least), which callers check instead of
    scanning all of J.
    """
    J = J.detach()
    if J.shape[0] == 0:
        return np.zeros((0, 0))
    kernel = _kernel_for(J)
    if kernel is not None:
        return kernel.gramian(J).numpy()
    if (G := gramian_gpu.gramian(J)) is not None:  # None off CUDA and where the Triton kernel does not apply
        return G.cpu().numpy()
    columns = max(1, (GRAMIAN_BLOCK if J.device.type == "cpu" else GRAMIAN_BLOCK_GPU) // J.shape[0])
    if J.shape[1] <= columns:  # one block: torch beats numpy's conversion here (94 against 245 µs on LeNet's J)
        block = J.to(torch.float64)
        return (block @ block.T).cpu().numpy()
    if J.device.type == "cpu" and J.dtype in (torch.float32, torch.float64):
        # numpy turns `a @ a.T` into BLAS syrk (half the flops): 1.5× torch's addmm here
        G = np.zeros((J.shape[0], J.shape[0]))
        for start in range(0, J.shape[1], columns):
            block = J[:, start : start + columns].numpy().astype(np.float64)
            G += block @ block.T
        return G
    G = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64, device=J.device)
    for start in range(0, J.shape[1], columns):
        block = J[:, start : start + columns].to(torch.float64)
        G.addmm_(block, block.T)
        del block  # else the next block is built while this one is still held: twice the memory
    return G.cpu().numpy()


# Up to this many entries the AVX2 kernel forms d = Jᵀw and checks it in one pass; on a larger J (memory-bound) BLAS's
# GEMV plus a sum is as fast (ResNet18 × 20 tasks: 65–80 ms either way, timings that vary by 10%).
COMBINE_MAX = 1 << 22


def weights_like(weights: np.ndarray, J: Tensor) -> Tensor:
    """float64 weights as a tensor on J's device in J's dtype (on the CPU via numpy: half the time of .to)."""
    if J.device.type == "cpu" and J.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(weights.astype(np.float32 if J.dtype == torch.float32 else np.float64))
    return torch.from_numpy(weights).to(J.device, J.dtype)


def normalize_gramian(G: np.ndarray) -> tuple[np.ndarray, float]:
    """G / trace(G) and trace(G); scale-invariant methods solve on this to avoid tiny/huge numbers."""
    scale = float(np.trace(G))
    return (G / scale if scale > 0 else G), scale


def uniform_weights(num_tasks: int) -> np.ndarray:
    """The fallback of every solver that fails: the plain mean of the task gradients."""
    return np.full(num_tasks, 1.0 / num_tasks)


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

    def _set_weights(self, weights: Tensor | np.ndarray) -> None:
        if isinstance(weights, np.ndarray):  # copied: some methods keep the array they return (uniform, fixed)
            self.weights = torch.from_numpy(np.array(weights, dtype=np.float64))
        elif weights.dtype is torch.float64 and weights.is_cpu and not weights.requires_grad:
            self.weights = weights.clone()  # the common case, half the time of .to(copy=True)
        else:
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
    # Methods that form the Gramian check its K×K entries for NaN/inf instead of all K×P entries of J.
    scans_jacobian: ClassVar[bool] = True
    # Whether the method forms J Jᵀ or Jᵀw through `gramian` and the kernels (runs record which path did).
    uses_jacobian_kernels: ClassVar[bool] = False

    def _check_inputs(self, J: Tensor, losses: Tensor | None) -> Tensor | None:
        """Validate J (and the losses where the method reads them); return the losses the method gets:
        detached, or None for the methods that ignore them (the trainer checks every loss itself)."""
        # Called every step: messages are formatted only on failure.
        if J.dim() != 2 or not J.is_floating_point():
            raise ValueError(f"{self.name}: J must be a float matrix (tasks × parameters), got shape {tuple(J.shape)}")
        if J.shape[0] != self.num_tasks:
            self._ensure_tasks(J.shape[0])
        if self.scans_jacobian:
            check_finite(self.name, J, "the task gradients J")
        if not self.needs_losses:
            return None
        if losses is None:
            raise ValueError(f"{self.name}: with options {self.options} the losses are needed: call agg(J, losses)")
        self._check_losses(losses)
        return losses.detach()

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        d, weights = self._aggregate(J, self._check_inputs(J, losses))
        self._set_weights(weights)
        return d

    def _aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor | np.ndarray]:
        """Return d and the weights w with d = Jᵀw (NaN-filled where the method has none)."""
        raise NotImplementedError

    def head_weights(self, losses: Tensor) -> Tensor:
        """Weights of each task's loss gradient on its own head under `head_update: weighted`: the last step's
        `weights`, or 1 where the method has none (GradDrop, as LibMTL's heads get ∇L_k)."""
        weights = self.weights.to(losses)
        return weights if torch.isfinite(weights).all() else torch.ones_like(losses)


class WeightedAggregator(GradientAggregator):
    """d = Jᵀw with w computed from the Gramian (and losses): subclasses write `_weights`."""

    scans_jacobian = False
    uses_jacobian_kernels = True
    needs_gramian: ClassVar[bool] = True  # False: weights known without G (uniform, fixed); G is then None

    def weights_from(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        """The weights w for J (also stored in `self.weights`); the trainer applies Σ w_k g_k."""
        weights = self._gramian_weights(J, self._check_inputs(J, losses))
        self._set_weights(weights)
        return self.weights.clone()

    def _gramian_weights(self, J: Tensor, losses: Tensor | None) -> np.ndarray:
        if self.needs_gramian:
            G = gramian(J)
            if not np.isfinite(G).all():
                raise diverged(self.name, "the task gradients J")
        else:
            G = None  # NaN/inf in J reaches d = Jᵀw (0·inf is NaN too): _aggregate checks d, P entries not K×P
        loss_values = None if losses is None else losses.to("cpu", torch.float64).numpy()
        weights = np.asarray(self._weights(G, loss_values), dtype=np.float64)
        if not np.isfinite(weights).all():  # safety net; the solvers are not expected to get here
            logger.warning("%s: non-finite weights %s; using uniform weights 1/K for this step", self.name, weights)
            weights = uniform_weights(J.shape[0])
        return weights

    _constant: tuple | None = None  # (float64 CPU weights, the same in J's device and dtype) when not needs_gramian

    def reset(self, num_tasks: int, device: torch.device | str | None = None) -> None:
        self._constant = None
        super().reset(num_tasks, device)

    def _aggregate(self, J: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor | np.ndarray]:
        if self.needs_gramian:
            weights = self._gramian_weights(J, losses)
            return torch.mv(J.T, weights_like(weights, J)), weights  # GEMV on Jᵀ: 2× w @ J's speed
        # Weights known without G (uniform, fixed): computed once per device and dtype (reset() forgets them).
        # A NaN/inf in J reaches d = Jᵀw (0·inf is NaN too), so d is checked instead of all of J.
        constant = self._constant
        if constant is None or constant[1].dtype is not J.dtype or constant[1].device != J.device:
            weights = self._gramian_weights(J, losses)
            constant = self._constant = (torch.from_numpy(weights.copy()), weights_like(weights, J))
        weights, w = constant
        kernel = _kernel_for(J) if J.numel() <= COMBINE_MAX else None
        if kernel is not None:  # the product and the check in one pass: 11 against 16 µs on LeNet's J
            d, finite = kernel.combine(J, w)
            if not finite:
                raise diverged(self.name, "the task gradients J")
        else:
            d = torch.mv(J.T, w)
            check_finite(self.name, d, "the task gradients J")
        return d, weights  # a tensor: _set_weights copies it, so agg.weights never aliases the cache

    def _weights(self, G: np.ndarray, losses: np.ndarray | None) -> np.ndarray:
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

    def _weighted_sum(self, losses: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        weights = weights.detach()
        return (weights.to(losses) * losses).sum(), weights
