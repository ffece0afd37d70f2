"""Inputs shared by the aggregator tests, and the properties a method's test class declares (TorchJD's style):
`class TestUPGrad(NonConflicting, PermutationInvariant, ...)` with `name = "upgrad"` runs every check of every
property it lists, for each option set in `configurations`."""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import pytest
import torch

from mtlcore.aggregators import NonFiniteGradientError, WeightedAggregator, available, get
from mtlcore.aggregators.gramian import gramian

J_REFERENCE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def make(name: str, num_tasks: int = 2, seed: int = 0, **options):
    """Aggregator `name`; fixed gets weights 1/(k+1) unless given, randomised methods a CPU generator seeded `seed`."""
    if name == "fixed" and "weights" not in options:
        options["weights"] = [1.0 / (k + 1) for k in range(num_tasks)]
    agg = get(name, **options)
    if agg.randomised:
        agg.set_generator(torch.Generator().manual_seed(seed))
    return agg


GRADIENT_METHODS = [name for name in available() if make(name).kind == "gradient"]
LOSS_METHODS = [name for name in available() if name not in GRADIENT_METHODS]


def random_jacobian(num_tasks: int, dim: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(num_tasks, dim, generator=generator)
    return torch.randn(num_tasks, rank, generator=generator) @ torch.randn(rank, dim, generator=generator)


# (K, P, rank): every K ∈ {2,3,5} × P ∈ {3,10,50} at full rank, plus rank-deficient ones
CASES = [(k, p, None) for k in (2, 3, 5) for p in (3, 10, 50)] + [
    (2, 10, 1), (3, 10, 1), (3, 50, 2), (5, 10, 2), (5, 50, 3), (5, 3, 2),
]


def jacobians() -> list[torch.Tensor]:
    return [random_jacobian(k, p, r, seed) for seed, (k, p, r) in enumerate(CASES)]


def two_task_jacobians() -> list[torch.Tensor]:
    return [J for J in jacobians() if J.shape[0] == 2]


def is_full_row_rank(J: torch.Tensor) -> bool:
    # rtol above float32 rounding: a product of thin factors is rank-deficient here
    return torch.linalg.matrix_rank(J.double(), rtol=1e-5).item() == J.shape[0]


def losses_for(J: torch.Tensor) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, J.shape[0])


def drive(agg, steps: range, num_tasks: int = 3) -> list[torch.Tensor]:
    """What `agg` returns over `steps` of a fixed sequence of inputs, as the trainer calls it: d (gradient-level) or
    the combined loss (loss-level, with its hooks), and the weights."""
    outputs = []
    W = torch.nn.Parameter(torch.linspace(-2.0, 1.0, 4))
    for s in steps:
        if agg.kind == "gradient":
            J = random_jacobian(num_tasks, 10, None, seed=100 + s)
            outputs.append(agg(J, torch.linspace(0.5, 2.0, num_tasks) * (1 + 0.1 * s)))
        else:
            losses = torch.stack([(1.0 + s + k) * W.square().sum() / (1 + k * s) for k in range(num_tasks)])
            outputs.append(agg.combine(losses, last_shared=[W]).detach())
            agg.after_step(losses.detach() * 0.9)
            agg.end_epoch(losses.detach())
        outputs.append(agg.weights)
    return outputs


class Method:
    """A method's test class: `name`, and `configurations`, the option sets every property is checked with."""

    name: ClassVar[str]
    configurations: ClassVar[list[dict[str, Any]]] = [{}]

    def pytest_generate_tests(self, metafunc):
        if "options" in metafunc.fixturenames:
            ids = [",".join(f"{k}={v}" for k, v in options.items()) or "defaults" for options in self.configurations]
            metafunc.parametrize("options", self.configurations, ids=ids)

    def make(self, options: dict[str, Any], num_tasks: int = 2, seed: int = 0):
        return make(self.name, num_tasks, seed, **options)


# --- properties of gradient-level methods: agg(J) -> d ---------------------------------------------------------------
class ExpectedStructure(Method):
    """d has one entry per column of J and is finite, also for a zero J (then d = 0), a huge J and a zero row; the
    weights are K float64 numbers on the CPU."""

    @pytest.mark.parametrize("kind", ["typical", "zero", "huge", "one_zero_row"])
    def test_expected_structure(self, options, kind):
        J = random_jacobian(3, 10, None, seed=11)
        J = {"typical": J, "zero": torch.zeros(3, 10), "huge": J / J.norm() * 1e20}.get(kind, J)
        if kind == "one_zero_row":
            J[1] = 0.0
        agg = self.make(options, 3)
        d = agg(J, torch.tensor([0.5, 1.0, 2.0]))
        assert d.shape == (10,) and d.dtype == J.dtype and torch.isfinite(d).all()
        assert agg.weights.shape == (3,) and agg.weights.dtype == torch.float64 and agg.weights.device.type == "cpu"
        if kind == "zero":
            assert (d == 0).all()


class Weighted(Method):
    """d = Jᵀw with the reported weights, and `weighting(J Jᵀ)` (TorchJD's Weighting of the Gramian) gives them."""

    def test_update_is_the_weighted_sum_of_the_task_gradients(self, options):
        for J in [J_REFERENCE, *jacobians()]:
            agg = self.make(options, J.shape[0])
            d = agg(J.double(), losses_for(J))
            torch.testing.assert_close(agg.weights @ J.double(), d, rtol=1e-12, atol=1e-12 * J.norm().item())

    def test_weighting_of_the_gramian_gives_the_same_weights(self, options):
        for J in jacobians():
            from_jacobian, from_gramian = self.make(options, J.shape[0]), self.make(options, J.shape[0])
            from_jacobian(J, losses_for(J))
            weights = from_gramian.weighting(J.double() @ J.double().T, losses_for(J))
            assert isinstance(from_gramian, WeightedAggregator)
            assert weights.dtype == torch.float64 and weights.device.type == "cpu"
            torch.testing.assert_close(weights, from_jacobian.weights, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(from_gramian.weights, weights, rtol=0, atol=0)


class NonConflicting(Method):
    """d · g_k ≥ 0 for every task k: up to float32 rounding of d = Jᵀw, relative to Σ|w_k|‖g_k‖ (d may be ~0), and to
    `regularisation` (UPGrad's and DualProj's reg_eps). `full_rank_only`: where the method solves a problem that has
    no solution for dependent gradients (Nash-MTL)."""

    full_rank_only: ClassVar[bool] = False

    def regularisation(self, options: dict[str, Any]) -> float:
        return 0.0

    def test_non_conflicting(self, options):
        for case, J in zip(CASES, jacobians()):
            if self.full_rank_only and not is_full_row_rank(J):
                continue
            agg = self.make(options, J.shape[0])
            d = agg(J, losses_for(J)).double()
            J64 = J.double()
            rounding = 1e-5 * J64.norm(dim=1) * (agg.weights.abs() @ J64.norm(dim=1))
            slack = rounding + self.regularisation(options) * (J64 @ J64.T).trace() * agg.weights.abs().max()
            assert (J64 @ d >= -slack - 1e-12).all(), case


class PermutationInvariant(Method):
    """Permuting the rows of J (and the losses) leaves d unchanged; a randomised method draws the same numbers. In
    float64: d may be ~0 (0 in the convex hull), the difference of terms ~‖J‖ that float32 would round."""

    tolerance: ClassVar[float] = 1e-4

    def test_permutation_invariance(self, options):
        for case, J in zip(CASES, jacobians()):
            J = J.double()
            permutation = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(1))
            losses = losses_for(J)
            d = self.make(options, J.shape[0])(J, losses)
            d_permuted = self.make(options, J.shape[0])(J[permutation], losses[permutation])
            scale = d.norm() + 1e-4 * J.norm()  # d may be ~0 (0 in the convex hull)
            assert ((d - d_permuted).norm() / scale).item() < self.tolerance, case


class LinearUnderScaling(Method):
    """TorchJD's property: A(diag(αc₁ + βc₂) J) = α A(diag(c₁) J) + β A(diag(c₂) J) for positive row scales c₁, c₂
    and α, β > 0, i.e. d is linear in positive scales of the task gradients."""

    def test_linear_under_scaling(self, options):
        for case, J in zip(CASES, jacobians()):
            J = J.double()
            generator = torch.Generator().manual_seed(2)
            c1, c2, alpha, beta = (torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
                                   for shape in (J.shape[0], J.shape[0], (), ()))
            x1 = self.make(options, J.shape[0])(c1[:, None] * J)
            x2 = self.make(options, J.shape[0])(c2[:, None] * J)
            x = self.make(options, J.shape[0])((alpha * c1 + beta * c2)[:, None] * J)
            torch.testing.assert_close(x, alpha * x1 + beta * x2, rtol=0, atol=1e-6 * J.norm().item(), msg=str(case))


class Homogeneous(Method):
    """d(sJ) = s·d(J) for s > 0: the weights do not depend on the gradients' scale."""

    @pytest.mark.parametrize("scale", [1e-3, 3.0, 1e6])
    def test_homogeneity(self, options, scale):
        J = random_jacobian(3, 10, None, seed=7)
        d = self.make(options, 3)(J, losses_for(J))
        d_scaled = self.make(options, 3)(scale * J, losses_for(J))
        torch.testing.assert_close(d_scaled / scale, d, rtol=1e-3, atol=1e-5)


# --- properties of every method ---------------------------------------------------------------------------------------
class Deterministic(Method):
    """Two instances built alike (a randomised one with generators seeded alike) give the same outputs bit for bit."""

    def test_deterministic(self, options):
        first, second = drive(self.make(options, 3), range(3)), drive(self.make(options, 3), range(3))
        for a, b in zip(first, second):
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


class ResumesBitForBit(Method):
    """A new instance that loads `state_dict()` mid-run continues exactly as the original, its random draws included
    (the new one is seeded otherwise: only the saved generator state can make them agree)."""

    def test_resumes_bit_for_bit(self, options):
        first = self.make(options, 3)
        drive(first, range(3))
        resumed = self.make(options, 3, seed=99)
        resumed.reset(3)
        resumed.load_state_dict(first.state_dict())
        for a, b in zip(drive(resumed, range(3, 6)), drive(first, range(3, 6))):
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


class StrictOptions(Method):
    """Unknown options are refused with the valid ones named (with their defaults); `bad_options` lists option
    values the method refuses, with the message's start; `options` holds the resolved options."""

    bad_options: ClassVar[list[tuple[dict[str, Any], str]]] = []

    def test_unknown_options_are_listed_with_the_valid_ones(self, options):
        agg = self.make(options)
        with pytest.raises(ValueError, match=rf"{self.name}: unknown option\(s\) \['bogus'\]") as refused:
            get(self.name, bogus=1, **agg.options)
        for key in type(agg).defaults:
            assert f"{key}=" in str(refused.value)
        if not agg.randomised:
            with pytest.raises(ValueError, match=r"unknown option\(s\) \['generator'\]"):
                get(self.name, generator=torch.Generator(), **agg.options)
        assert set(agg.options) == set(type(agg).defaults)
        # every value given is kept (a mapping of a sub-method's options: with its defaults filled in)
        assert all(agg.options[key] == value or isinstance(value, dict) and value.items() <= agg.options[key].items()
                   for key, value in options.items())

    def test_bad_option_values_are_refused(self):
        for bad, message in self.bad_options:
            with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
                get(self.name, **bad)


class DivergenceDetection(Method):
    """NaN/inf in the inputs a method reads raise NonFiniteGradientError (the run has diverged): in J for a gradient
    method, in G for `weighting`, in the losses where it reads them (`needs_losses`, every loss-level method); the
    losses of the others are ignored (the trainer checks every loss)."""

    def test_non_finite_inputs_raise(self, options):
        agg = self.make(options, 3)
        losses = torch.tensor([0.5, 1.0, 2.0])
        if agg.kind == "loss":
            for bad in (math.nan, math.inf):
                with pytest.raises(NonFiniteGradientError, match="the losses contain NaN or inf"):
                    agg.combine(losses.clone().index_fill_(0, torch.tensor([1]), bad), last_shared=[torch.ones(2)])
            return
        for where, bad in (((0, 1), math.nan), ((1, 3), math.inf), ((2, 9), -math.inf)):
            J = random_jacobian(3, 10, None, seed=12)
            J[where] = bad
            with pytest.raises(NonFiniteGradientError, match="the run has diverged"):
                self.make(options, 3)(J, losses)
            if isinstance(agg, WeightedAggregator):
                with pytest.raises(NonFiniteGradientError):
                    self.make(options, 3).weighting(gramian(J), losses)
        J, nan_losses = random_jacobian(3, 10, None, seed=3), torch.tensor([1.0, math.nan, 2.0])
        if agg.needs_losses:
            with pytest.raises(NonFiniteGradientError, match="the losses contain NaN or inf"):
                self.make(options, 3)(J, nan_losses)
        else:
            torch.testing.assert_close(self.make(options, 3)(J, nan_losses), self.make(options, 3)(J))


# --- properties of loss-level methods: agg.combine(losses) -> scalar -------------------------------------------------
class WeightsAreLossGradients(Method):
    """The reported weights are the weights of each task's loss gradient in the combined loss: ∂combine/∂L_k."""

    def test_weights_are_the_loss_gradients(self, options):
        agg = self.make(options, 3)
        W = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        for step in range(3):
            losses = torch.stack([(k + 1.0 + step) * W.square().sum() for k in range(3)])
            (gradient,) = torch.autograd.grad(agg.combine(losses, last_shared=[W]), losses)
            assert agg.weights.dtype == torch.float64 and torch.isfinite(agg.weights).all()
            torch.testing.assert_close(gradient.double(), agg.weights, rtol=1e-6, atol=0)
            agg.after_step(losses.detach() * 0.9)
            agg.end_epoch(losses.detach())

    def test_preview_weights_are_the_next_combines(self, options):
        """`preview_weights` on a copy (as the trainer measures) gives the weights the next combine applies."""
        agg = self.make(options, 3)
        drive(agg, range(2))
        W = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        losses = torch.stack([(k + 2.0) * W.square().sum() for k in range(3)])
        preview = copy.deepcopy(agg).preview_weights(losses)
        agg.combine(losses, last_shared=[W])
        torch.testing.assert_close(preview, agg.weights, rtol=0, atol=0)
