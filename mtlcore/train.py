"""The training loop: STL or MTL with the uniform multi-task gradient (or an aggregator) → run dataset.

`run(config)` trains for `epochs` epochs of `ceil(largest task's train size / batch_size)` steps, the same
for STL and MTL; every step draws one batch per task (the multi-input regime). At epoch 0 and after every
epoch it records, per task, the full training loss and the validation and test loss and score. A run is
bit-for-bit reproducible from `seed` on the CPU, and a killed run resumes from its last finished epoch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from mtlcore import __version__
from mtlcore._seeding import derive_seed, torch_generator
from mtlcore.config import RunConfig
from mtlcore.data import Setting, load_setting
from mtlcore.metrics.common import mean_loss
from mtlcore.metrics.schedule import FactorSchedule, applied_update
from mtlcore.metrics.scores import evaluate
from mtlcore.models import MultiTaskModel, build_model
from mtlcore.models.fused import kernel_name
from mtlcore.results import load_run, new_run_dataset, save_atomic

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for but CUDA is not available here; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


class BatchSampler:
    """Draws batches from one task's training set: a fresh seeded permutation each pass (epoch)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, min(batch_size, size), generator
        self.order = torch.randperm(size, generator=generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:  # drop the incomplete tail, reshuffle
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        index = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


def seeded_reset(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise `module` from `seed` alone, whatever else was built before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def make_model(config: RunConfig, setting: Setting) -> MultiTaskModel:
    """The encoder and every head are seeded by (seed, name): STL and MTL runs of one seed start alike."""
    model = build_model(setting.encoder, {t: setting.tasks[t].num_classes for t in config.tasks},
                        dropout=config.dropout)
    seeded_reset(model.encoder, derive_seed(config.seed, "init", "encoder"))
    for task in config.tasks:
        seeded_reset(model.heads[task], derive_seed(config.seed, "init", "head", task))
    return model


def use_deterministic_kernels(device: torch.device) -> None:
    """On CUDA, cuDNN's autotuned and atomic-add kernels would make runs of one seed differ bit-wise. A global
    switch (torch has no per-model one); the trainer sets it for every CUDA run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # The fused kernels (CPU and CUDA) update every tensor in one pass: on the quick profile's LeNet step,
    # Adam's update went from 1.7 ms (per-tensor loop, the CPU default) to 0.37 ms, ~5% of a step.
    fused = {"fused": True} if tensors and all(p.device.type in ("cpu", "cuda") for p in tensors) else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay, **fused)


@dataclass
class StepLosses:
    """One step's task losses: stacked (K,), as the K scalars they were computed as, and the features."""

    losses: torch.Tensor
    parts: list[torch.Tensor]
    features: torch.Tensor | None = None


def multitask_losses(model: MultiTaskModel, batches: list[tuple[str, torch.Tensor, torch.Tensor]],
                     kinds: dict[str, str]) -> StepLosses:
    """The K task losses of one step and the shared features; the tasks' batches go through the encoder
    together (one forward), which equals separate forwards for encoders without batch statistics."""
    features = model.encoder(torch.cat([x for _, x, _ in batches]))
    losses, start = [], 0
    for task, x, y in batches:
        z = features[start : start + len(x)]
        start += len(x)
        losses.append(mean_loss(model.heads[task](z), y, kinds[task]))
    return StepLosses(torch.stack(losses), losses, features)


def per_task_losses(model: MultiTaskModel, batches: list[tuple[str, torch.Tensor, torch.Tensor]],
                    kinds: dict[str, str]) -> StepLosses:
    """The K task losses with one forward (and so one graph) per task: the gradient of one of `parts`
    then costs one backward through its own batch only, instead of through every task's batch."""
    losses = [mean_loss(model(x, task), y, kinds[task]) for task, x, y in batches]
    return StepLosses(torch.stack(losses), losses)


class Diverged(FloatingPointError):
    pass


class Trainer:
    """One run's state; `fit()` runs the remaining epochs and returns the run dataset."""

    def __init__(self, config: RunConfig, setting: Setting, device: torch.device):
        self.config, self.device = config, device
        use_deterministic_kernels(device)
        self.setting = setting.to(device)
        self.tasks = list(config.tasks)
        self.kinds = {t: self.setting.tasks[t].loss for t in self.tasks}  # loss name per task
        # channels-last makes oneDNN's small-channel convolutions about twice as fast on the CPU.
        self.model = make_model(config, setting).to(device, memory_format=torch.channels_last)
        self.scale = 1.0 if config.loss_scale == "sum" else float(len(self.tasks))
        self.aggregator = self._make_aggregator()
        extra = list(self.aggregator.parameters()) if self.aggregator is not None else []
        self.optimizer = make_optimizer(config, list(self.model.parameters()) + extra)
        sizes = [len(self.setting.tasks[t].train) for t in self.tasks]
        self.steps_per_epoch = math.ceil(max(sizes) / config.batch_size)
        self._choose_step_path()
        self.samplers = {t: BatchSampler(len(self.setting.tasks[t].train), config.batch_size,
                                         torch_generator(config.seed, "batches", t)) for t in self.tasks}
        torch.manual_seed(derive_seed(config.seed, "dropout"))
        self.factors = FactorSchedule(config.metrics, config.seed, config.batch_size, config.loss_scale)
        self.epoch, self.step = 0, 0
        self.weight_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.weight_count = 0
        self.status = "complete"
        self.message = ""
        self.ds = new_run_dataset(self.tasks, config.epochs, self._attrs())

    # -- aggregation ----------------------------------------------------------------------------------
    def _choose_step_path(self) -> None:
        # Methods that need J of the shared parameters get one graph per task (see per_task_losses) and K
        # backward passes. A joint forward with one batched backward was 1.2x faster on a GPU for LeNet but
        # 1.2x slower for ResNet18 with 20 tasks (benchmarks/README.md), so both devices take this path.
        # The two forwards agree for encoders without batch statistics, such as LeNet.
        needs_jacobian = self.aggregator is not None and self.aggregator.kind == "gradient" \
            and self.aggregator.jacobian_of == "shared"
        self._forward = per_task_losses if needs_jacobian else multitask_losses

    def _make_aggregator(self):
        if self.config.aggregator == "uniform" and not self.config.aggregator_options:
            return None  # the fast path: one backward of Σ L_k / C
        from mtlcore import aggregators

        aggregator = aggregators.get(self.config.aggregator, **self.config.aggregator_options)
        aggregator.reset(len(self.tasks), self.device)
        if aggregator.randomised:
            aggregator.set_generator(torch_generator(self.config.seed, "aggregator",
                                                     device=aggregator.generator_device(self.device)))
        return aggregator

    def _update(self, step: StepLosses) -> torch.Tensor:
        """Set every parameter's .grad for this step; return the task weights applied to the shared part."""
        losses = step.losses
        if self.aggregator is None:
            (losses.sum() / self.scale).backward()
            if self.config.head_update == "own" and self.scale != 1.0:
                for task in self.tasks:
                    for p in self.model.task_parameters(task):
                        p.grad.mul_(self.scale)
            return torch.full((len(self.tasks),), 1.0 / self.scale)
        return self._aggregated_update(step)

    def _aggregated_update(self, step: StepLosses) -> torch.Tensor:
        from mtlcore.aggregators import set_grad, task_jacobian, unflatten_into_grads

        agg, model, losses = self.aggregator, self.model, step.losses
        shared = model.shared_parameters()
        heads = [p for task in self.tasks for p in model.task_parameters(task)]
        own_heads = self.config.head_update == "own"
        if agg.kind == "loss":
            last = model.last_shared_layer() if agg.needs_last_shared else None
            agg.combine(losses, last_shared=last).backward(retain_graph=own_heads)
        elif agg.jacobian_of == "representation":  # MGDA-UB: weights from the gradients w.r.t. the features
            w = agg.weights_from(task_jacobian(losses, [step.features]), losses.detach())
            grads = torch.autograd.grad((w.to(losses) * losses).sum(), shared, retain_graph=True)
            for p, g in zip(shared, grads):
                set_grad(p, g)
        else:
            jacobian = task_jacobian(step.parts, shared, method="loop")
            unflatten_into_grads(agg(jacobian, losses.detach()), shared)
        weights = agg.weights.to(torch.float64)
        if agg.kind == "gradient" or own_heads:
            # Heads see only their own task's loss: unweighted ("own"), or as the method weighs it.
            head_weights = torch.ones_like(losses) if own_heads else agg.head_weights(losses.detach())
            for p, g in zip(heads, torch.autograd.grad((head_weights * losses).sum(), heads)):
                set_grad(p, g)
        return weights

    # -- one epoch ------------------------------------------------------------------------------------
    def _batches(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for task in self.tasks:
            index = self.samplers[task].next().to(self.device)
            train = self.setting.tasks[task].train
            out.append((task, train.x[index], train.y[index]))
        return out

    def _train_epoch(self, bar: tqdm) -> None:
        self.model.train()
        epoch_losses = torch.zeros(len(self.tasks), dtype=torch.float64)
        for _ in range(self.steps_per_epoch):
            self.optimizer.zero_grad(set_to_none=True)
            batches = self._batches()
            step = self._forward(self.model, batches, self.kinds)
            losses = step.losses
            if not torch.isfinite(losses).all():
                raise Diverged(f"non-finite training loss {losses.tolist()} at step {self.step + 1}")
            weights = self._update(step)
            self.optimizer.step()
            if self.aggregator is not None and self.aggregator.needs_losses_after:
                with torch.no_grad():  # FAMO learns from the loss change on the same batch
                    self.aggregator.after_step(multitask_losses(self.model, batches, self.kinds).losses)
            epoch_losses += losses.detach().double().cpu()
            self.weight_sum += weights.detach().double().cpu()
            self.weight_count += 1
            self.step += 1
            bar.update(1)
            if self.step % 50 == 0:
                bar.set_postfix(loss=f"{float(losses.detach().sum()):.3g}", refresh=False)
        if self.aggregator is not None:
            self.aggregator.end_epoch(epoch_losses / self.steps_per_epoch)  # DWA's loss history

    def _record(self) -> None:
        e = self.epoch
        for i, task in enumerate(self.tasks):
            data = self.setting.tasks[task]
            for split_name in ("train", "val", "test"):
                split = getattr(data, split_name)
                loss, score = evaluate(self.model, task, split.x, split.y, self.config.eval_batch_size, loss=data.loss)
                self.ds[f"{split_name}_loss"][e, i] = loss
                if split_name != "train":
                    self.ds[f"{split_name}_score"][e, i] = score
        if self.weight_count:
            self.ds["task_weight"][e, :] = (self.weight_sum / self.weight_count).numpy()
            self.weight_sum.zero_()
            self.weight_count = 0
        self.ds["step"][e] = self.step
        if not np.isfinite(self.ds["train_loss"][e].values).all():
            raise Diverged(f"non-finite full training loss at epoch {e}")
        if self.factors.due(e):
            update = applied_update(self.aggregator, self.config.loss_scale, len(self.tasks))
            for name, values in self.factors.measure(self.model, self.setting, self.tasks, e, update).items():
                self.ds[name][e] = values
            self.ds.attrs["metrics_seconds"] = self.factors.spent

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samplers": {t: s.state_dict() for t, s in self.samplers.items()},
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "aggregator": self.aggregator.state_dict() if self.aggregator is not None else None,
            "trajectory": {name: self.ds[name].values.copy() for name in self.ds.data_vars},
            "steps": self.ds["step"].values.copy(),
            "wall_seconds": self.ds.attrs.get("wall_seconds", 0.0),
            "metrics_seconds": self.factors.spent,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for task, sampler in self.samplers.items():
            sampler.load_state_dict(state["samplers"][task])
        torch.random.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.aggregator is not None and state["aggregator"] is not None:
            self.aggregator.load_state_dict(state["aggregator"])
        for name, values in state["trajectory"].items():
            self.ds[name].values[:] = values
        self.ds["step"].values[:] = state["steps"]
        self.ds.attrs["wall_seconds"] = state["wall_seconds"]
        self.factors.spent = state["metrics_seconds"]

    # -- the run --------------------------------------------------------------------------------------
    def _attrs(self) -> dict:
        c = self.config
        return {
            "run_id": c.content_hash(), "setting": c.setting, "mode": c.mode, "aggregator": c.aggregator,
            "seed": c.seed, "tasks": json.dumps(list(c.tasks)), "config": json.dumps(c.resolved(), sort_keys=True),
            "status": "running", "message": "", "steps_per_epoch": 0, "device": str(self.device),
            "mtlcore_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
            "lenet_block_kernel": kernel_name() if self.device.type == "cpu" else "pytorch",
            "jacobian_kernels": self._jacobian_kernels(),
            "python_version": platform.python_version(),
            "host": platform.node(), "data_info": json.dumps(self.setting.info, sort_keys=True), "wall_seconds": 0.0,
        }

    def _jacobian_kernels(self) -> str:
        """What forms J Jᵀ and Jᵀw (recorded: their sums round in another order): "none" for the methods that form
        neither (loss-level ones, GradDrop), so that their runs do not build the kernels."""
        from mtlcore.aggregators.base import jacobian_kernels

        if not getattr(self.aggregator, "uses_jacobian_kernels", False):
            return "none"
        shared = sum(p.numel() for p in self.model.shared_parameters())  # J's columns: the GPU probe's shape
        return jacobian_kernels(self.device, len(self.tasks), shared)

    def fit(self, checkpoint: Path | None = None, progress: bool = True) -> xr.Dataset:
        self.ds.attrs["steps_per_epoch"] = self.steps_per_epoch
        total = self.steps_per_epoch * self.config.epochs
        started = time.perf_counter() - float(self.ds.attrs["wall_seconds"])
        label = f"{self.config.mode} {'+'.join(self.tasks)} seed {self.config.seed}"
        with tqdm(total=total, initial=self.step, desc=label, disable=not progress, leave=False, mininterval=2) as bar:
            try:
                if self.epoch == 0 and np.isnan(self.ds["train_loss"][0].values).all():
                    self._record()
                while self.epoch < self.config.epochs:
                    self._train_epoch(bar)
                    self.epoch += 1
                    self._record()
                    self.ds.attrs["wall_seconds"] = time.perf_counter() - started
                    if checkpoint is not None and self.epoch < self.config.epochs:
                        _atomic_torch_save(self.state_dict(), checkpoint)
            except FloatingPointError as error:  # Diverged, or an aggregator's NonFiniteGradientError
                self.status, self.message = "diverged", str(error)
                log.warning("run %s diverged: %s (trajectory so far is kept)", self.ds.attrs["run_id"], error)
        self.ds.attrs.update(status=self.status, message=self.message, wall_seconds=time.perf_counter() - started,
                             finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), epochs_done=self.epoch)
        if self.aggregator is not None:
            state = self.aggregator.state_dict()
            state.pop("generator", None)  # RNG bytes for resuming (in the checkpoint), not a result
            self.ds.attrs["aggregator_state"] = json.dumps(_jsonable(state))
        return self.ds


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return repr(value)


def run_path(config: RunConfig, results_dir: str | Path) -> Path:
    return Path(results_dir) / "runs" / f"{config.content_hash()}.nc"


def run(config: RunConfig | dict, *, data_root: str | Path | None = None, results_dir: str | Path | None = None,
        progress: bool = True, setting: Setting | None = None) -> xr.Dataset:
    """Train one run and return its dataset.

    With `results_dir`, the dataset is saved to `results_dir/runs/<hash>.nc` (atomically); a finished run
    already there is loaded instead of retrained, and a killed run resumes from its last epoch checkpoint.
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    path = run_path(config, results_dir) if results_dir is not None else None
    if path is not None and path.exists():
        return load_run(path)
    device = resolve_device(config.device)
    if setting is None:
        setting = load_setting(config.setting, list(config.tasks), config.setting_options, root=data_root)
    trainer = Trainer(config, setting, device)
    checkpoint = path.with_suffix(".partial.pt") if path is not None else None
    if checkpoint is not None and checkpoint.exists():
        trainer.load_state_dict(torch.load(checkpoint, weights_only=False))
        log.info("resuming run %s from epoch %d", config.content_hash(), trainer.epoch)
    ds = trainer.fit(checkpoint=checkpoint, progress=progress)
    if path is not None:
        save_atomic(ds, path)
        if checkpoint.exists():
            checkpoint.unlink()
    return ds
