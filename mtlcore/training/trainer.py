"""The training loop of any setting: STL or MTL under an update rule → the run dataset.

`run(config)` trains for `epochs` epochs of `ceil(setting.train_size / batch_size)` steps, the same for STL and
MTL. A step draws one batch per task (multi-input settings) or one batch carrying every task's target
(single-input settings) and puts it through the encoder in one forward, whatever the update rule, so that every
method trains the same model (batch statistics included); a gradient-level method on an encoder without batch
statistics gets one forward per task's batch instead, the same function at a K-th of the backward cost per row of J. At epoch 0 and after every epoch it records, per task,
the full training loss and the validation and test loss and scores. A run is bit-for-bit reproducible from `seed`
on the CPU, and a killed run resumes from its last finished epoch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

from mtlcore import __version__, settings
from mtlcore._seeding import derive_seed, torch_generator
from mtlcore.metrics.schedule import FactorSchedule
from mtlcore.metrics.scores import evaluate
from mtlcore.settings.base import MultiTaskModel, Setting, SettingData, count
from mtlcore.settings.locate import changed_files, digests, recording_reads
from mtlcore.training import claims
from mtlcore.training.claims import first_line
from mtlcore.training.config import RunConfig
from mtlcore.training.results import (check_results_dir, load_run, new_run_dataset, read_run, save_atomic,
                                     temporary_name)
from mtlcore.training.updates import Step, make_update

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
        if batch_size > size:  # never clamped silently: the run file would record a batch size it did not use
            raise ValueError(f"batch_size={batch_size} is larger than the training set ({size} examples); use "
                             f"batch_size <= {size}, or more training data (setting_options.train_size)")
        self.size, self.batch_size, self.generator = size, batch_size, generator
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


def seeded_reset(model: MultiTaskModel, module: torch.nn.Module, seed: int) -> None:
    """Re-initialise `module` (the model's encoder or a head) from `seed` alone, whatever else was built before it,
    as the model initialises its modules."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.initialize(module)


def make_model(config: RunConfig, setting: Setting, data_root: str | Path | None = None) -> MultiTaskModel:
    """The run's model, seeded by (seed, name) for the encoder and each head, so that STL and MTL runs of one seed
    start alike. A pretrained encoder keeps its weights."""
    resolved = config.resolved()
    model = setting.build_model(resolved["model"], config.tasks, resolved["model_options"], root=data_root)
    if not model.pretrained_encoder:
        seeded_reset(model, model.encoder, derive_seed(config.seed, "init", "encoder"))
    for task in config.tasks:
        seeded_reset(model, model.heads[task], derive_seed(config.seed, "init", "head", task))
    return model


def use_deterministic_kernels(device: torch.device) -> None:
    """On CUDA, cuDNN's autotuned and atomic-add kernels would make runs of one seed differ bit-wise. A global
    switch (torch has no per-model one); the trainer sets it for every CUDA run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # PyTorch's fused optimizer kernels (CPU and CUDA) update every tensor in one pass instead of a loop per tensor.
    fused = {"fused": True} if tensors and all(p.device.type in ("cpu", "cuda") for p in tensors) else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    momentum = config.momentum if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay, **fused)


class Diverged(FloatingPointError):
    pass


# The layout of `Trainer.state_dict()`; a checkpoint of another layout is set aside and the run restarts.
CHECKPOINT_FORMAT = 2


class Trainer:
    """One run's state; `fit()` runs the remaining epochs and returns the run dataset."""

    def __init__(self, config: RunConfig, setting: Setting, data: SettingData, device: torch.device,
                 data_root: str | Path | None = None):
        self.config, self.setting, self.device = config, setting, device
        use_deterministic_kernels(device)
        self.data = data.to(device)
        self.tasks = list(config.tasks)
        self.specs = {t: setting.task(t) for t in self.tasks}
        model = make_model(config, setting, data_root)
        self.model = model.to(device, memory_format=model.memory_format)
        self.update = make_update(config.aggregator, config.aggregator_options, self.model, self.tasks,
                                  loss_scale=config.loss_scale, head_update=config.head_update, seed=config.seed,
                                  device=device)
        self.update.set_batch_source(lambda: self._losses(self._batch()))  # for rules that need more than one batch
        self.optimizer = make_optimizer(config, list(self.model.parameters()) + self.update.parameters())
        options = setting.resolve_options(config.setting_options)
        self.steps_per_epoch = math.ceil(setting.train_size(options) / config.batch_size)
        if self.data.joint is not None:  # single input: one batch carries every task's target
            self.samplers = {"joint": BatchSampler(len(self.data.joint["train"]), config.batch_size,
                                                   torch_generator(config.seed, "batches"))}
        else:
            self.samplers = {t: BatchSampler(len(self.data.examples["train"][t]), config.batch_size,
                                             torch_generator(config.seed, "batches", t)) for t in self.tasks}
        self.augment = setting.augmentation(options)
        self.augment_generators = {key: torch_generator(config.seed, "augment", key, device=device)
                                   for key in self.samplers} if self.augment is not None else {}
        torch.manual_seed(derive_seed(config.seed, "dropout"))
        self.factors = FactorSchedule(config.metrics, config.seed, config.batch_size, config.loss_scale)
        self.epoch, self.step = 0, 0
        self.weight_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.weight_count = 0
        self.status = "complete"
        self.message = ""
        self.ds = new_run_dataset(self.tasks, config.epochs, {t: self.specs[t].scores for t in self.tasks},
                                  self._attrs())

    # -- one step ---------------------------------------------------------------------------------------
    def _batch(self) -> list[tuple[Any, Any]]:
        """The step's examples: one (inputs, targets) per task (multi-input), or one (inputs, {task: targets}),
        transformed by the setting's augmentation where it has one."""
        examples = {"joint": self.data.joint["train"]} if self.data.joint is not None else self.data.examples["train"]
        batch = []
        for key, sampler in self.samplers.items():
            inputs, targets = examples[key].take(sampler.next().to(self.device))
            if self.augment is not None:
                inputs = self.augment(inputs, self.augment_generators[key])
            batch.append((inputs, targets))
        return batch

    def _losses(self, batch: list[tuple[Any, Any]]) -> Step:
        """The task losses of a step: one forward of the encoder over every task's batch, each head on its task's rows
        of the features (all rows, single input). Where the update differentiates each task's loss on its own and the
        encoder treats every example on its own (no batch statistics), each task's batch gets its own forward: the
        same function, and each row of J then costs a backward through its own batch only."""
        if self.data.joint is not None:
            (inputs, targets), = batch
            features = self.model.encoder(inputs)
            parts = [self.specs[t].loss.mean(self.model.heads[t](features), targets[t]) for t in self.tasks]
            return Step(torch.stack(parts), parts, features)
        if self.update.per_task_graphs and not self.model.couples_examples:
            parts = [self.specs[t].loss.mean(self.model(x, t), y) for t, (x, y) in zip(self.tasks, batch)]
            return Step(torch.stack(parts), parts, None)
        features = self.model.encoder(self.setting.join_inputs([x for x, _ in batch]))
        parts, start = [], 0
        for task, (x, y) in zip(self.tasks, batch):
            n = count(x)
            parts.append(self.specs[task].loss.mean(self.model.heads[task](features[start : start + n]), y))
            start += n
        return Step(torch.stack(parts), parts, features)

    def train_step(self, batch: tuple | None = None) -> tuple[Step, torch.Tensor]:
        """One optimisation step on the next batch (or on `batch`, a `_batch()` result): one forward of the encoder,
        the run's update rule, the optimizer step and the rule's after-step hook. Returns the step's losses and the
        task weights the rule applied; a non-finite loss raises `Diverged` before anything is updated."""
        self.optimizer.zero_grad(set_to_none=True)
        batch = self._batch() if batch is None else batch
        step = self._losses(batch)
        if not torch.isfinite(step.losses).all():
            raise Diverged(f"non-finite training loss {step.losses.tolist()} at step {self.step + 1}")
        weights = self.update.apply(step)
        self.optimizer.step()
        self.update.after_step(lambda: self._losses(batch).losses)
        return step, weights

    def _train_epoch(self, bar: tqdm) -> None:
        self.model.train()
        epoch_losses = torch.zeros(len(self.tasks), dtype=torch.float64)
        for _ in range(self.steps_per_epoch):
            step, weights = self.train_step()
            losses = step.losses.detach()
            epoch_losses += losses.double().cpu()
            self.weight_sum += weights.detach().double().cpu()
            self.weight_count += 1
            self.step += 1
            bar.update(1)
            if self.step % 50 == 0:
                bar.set_postfix(loss=f"{float(losses.sum()):.3g}", refresh=False)
        self.update.end_epoch(epoch_losses / self.steps_per_epoch)

    def _record(self) -> None:
        e = self.epoch
        for split in ("train", "val", "test"):
            results = evaluate(self.model, self.specs, self.data, split, self.config.eval_batch_size)
            for i, task in enumerate(self.tasks):
                self.ds[f"{split}_loss"][e, i] = results[task].loss
                if split != "train":
                    scores = results[task].scores
                    self.ds[f"{split}_score"][e, i] = scores[self.specs[task].primary.name]
                    for name, value in scores.items():
                        self.ds[f"{split}_scores"].loc[{"epoch": e, "task": task, "score": name}] = value
        if self.weight_count:
            self.ds["task_weight"][e, :] = (self.weight_sum / self.weight_count).numpy()
            self.weight_sum.zero_()
            self.weight_count = 0
        self.ds["step"][e] = self.step
        if not np.isfinite(self.ds["train_loss"][e].values).all():
            raise Diverged(f"non-finite full training loss at epoch {e}")
        if self.factors.due(e):
            for name, values in self.factors.measure(self.model, self.data, self.specs, e,
                                                     self.update.direction()).items():
                self.ds[name][e] = values
            self.ds.attrs["metrics_seconds"] = self.factors.spent

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The state a killed run resumes from, in types `torch.load(..., weights_only=True)` reads (tensors,
        numbers, strings, lists, dicts): loading a checkpoint never runs code."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samplers": {t: s.state_dict() for t, s in self.samplers.items()},
            "augment_generators": {k: g.get_state() for k, g in self.augment_generators.items()},
            "torch_rng": torch.random.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "update": self.update.state_dict(),
            "trajectory": {name: torch.from_numpy(self.ds[name].values.copy()) for name in self.ds.data_vars},
            "steps": torch.from_numpy(self.ds["step"].values.copy()),
            "wall_seconds": float(self.ds.attrs.get("wall_seconds", 0.0)),
            "metrics_seconds": float(self.factors.spent),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
        self.epoch, self.step = state["epoch"], state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for task, sampler in self.samplers.items():
            sampler.load_state_dict(state["samplers"][task])
        for key, generator in self.augment_generators.items():
            generator.set_state(state["augment_generators"][key])
        torch.random.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state["update"] is not None:
            self.update.load_state_dict(state["update"])
        for name, values in state["trajectory"].items():
            self.ds[name].values[:] = values.numpy()
        self.ds["step"].values[:] = state["steps"].numpy()
        self.ds.attrs["wall_seconds"] = state["wall_seconds"]
        self.factors.spent = state["metrics_seconds"]

    # -- the run --------------------------------------------------------------------------------------
    def _attrs(self) -> dict:
        c = self.config
        resolved = c.resolved()
        return {
            "run_id": c.content_hash(), "setting": c.setting, "mode": c.mode, "aggregator": c.aggregator,
            "model": resolved["model"], "seed": c.seed, "tasks": json.dumps(list(c.tasks)),
            "config": json.dumps(resolved, sort_keys=True), "status": "running", "message": "", "steps_per_epoch": 0,
            "regime": self.setting.regime, "device": str(self.device),
            "mtlcore_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
            "model_info": json.dumps(self.model.describe(self.device), sort_keys=True),
            "python_version": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cudnn_deterministic": json.dumps(bool(torch.backends.cudnn.deterministic)),
            "host": platform.node(), "data_info": json.dumps(self.data.info, sort_keys=True), "wall_seconds": 0.0,
        }

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
        state = self.update.final_state()
        if state:
            self.ds.attrs["aggregator_state"] = json.dumps(_jsonable(state))
        return self.ds


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _resume(trainer: Trainer, checkpoint: Path) -> bool:
    """Load `checkpoint` into `trainer` (tensors and plain values only: a planted pickle runs nothing). One that
    cannot be loaded (corrupt, truncated, planted, of an older format) is renamed `<name>.rejected-<time>` with
    a warning; False then, and the caller restarts the run from scratch on a fresh trainer."""
    try:
        trainer.load_state_dict(torch.load(checkpoint, weights_only=True))
        return True
    except Exception as error:  # whatever the bytes: unpickling, format, shape or key errors
        aside = checkpoint.with_name(f"{checkpoint.name}.rejected-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.replace(checkpoint, aside)
        except FileNotFoundError:
            pass
        log.warning("checkpoint %s cannot be loaded safely (%s: %s); set aside as %s, the run restarts from "
                    "scratch", checkpoint, type(error).__name__, first_line(str(error)), aside.name)
        return False


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


def claim_path(path: Path) -> Path:
    """The claim file of the run file `path`: `<hash>.claim`."""
    return path.with_suffix(".claim")


def failure_path(path: Path) -> Path:
    """The failure record of the run file `path`: `<hash>.failed.json`."""
    return path.with_suffix(".failed.json")


def run(config: RunConfig | dict, *, data_root: str | Path | None = None, results_dir: str | Path | None = None,
        progress: bool = True, data: SettingData | None = None, wait: bool = True, retry_failed: bool = True,
        claim_timeout: float = claims.STALE_AFTER, poll_seconds: float = 5.0) -> xr.Dataset:
    """Train one run and return its dataset.

    With `results_dir`, the dataset is saved to `results_dir/runs/<hash>.nc` (atomically); a finished run
    already there is loaded instead of retrained, and a killed run resumes from its last epoch checkpoint.
    The run is trained under a claim (`<hash>.claim`), so that processes sharing the folder never train it twice:
    while another live process holds it, this one waits for its run file (`wait`, polling every `poll_seconds`)
    or raises `RunClaimed`; a claim without a heartbeat for `claim_timeout` seconds, or of a dead process of this
    host, is taken over. A run that raises is recorded in `<hash>.failed.json` before the error propagates;
    with `retry_failed=False` such a run raises `RunFailed` instead of training again.
    `data`: the setting's loaded data for the run's tasks, where the caller has it already.
    """
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    if results_dir is None:
        return _train(config, data_root, data, None, progress)
    check_results_dir(results_dir)
    path = run_path(config, results_dir)
    set_aside_if_stale(path, data_root)
    waiting = False
    while True:
        if path.exists():
            return load_run(path)
        claim = claims.acquire(claim_path(path), claim_timeout)
        if claim is not None:
            break
        busy = f"run {path.name} is being trained by {claims.describe(claim_path(path))}"
        if not wait:
            raise claims.RunClaimed(busy)
        if not waiting:
            log.warning("%s: waiting for its run file (or for the claim to go stale after %.0f s)", busy,
                        claim_timeout)
            waiting = True
        time.sleep(poll_seconds)
    with claim:
        if path.exists():  # finished by the process that held the claim before
            return load_run(path)
        failed = failure_path(path)
        record = claims.read_failure(failed)
        if record is not None and not retry_failed:
            raise claims.RunFailed(failed, record)
        try:
            ds = _train(config, data_root, data, path, progress)
        except Exception as error:  # recorded under the claim, so that no process retrains it unasked
            claims.record_failure(failed, error)
            raise
        save_atomic(ds, path)
        path.with_suffix(".partial.pt").unlink(missing_ok=True)
        failed.unlink(missing_ok=True)
    return ds


def set_aside_if_stale(path: Path, data_root: str | Path | None) -> str | None:
    """A finished run whose data files changed since is renamed `<hash>.nc.stale-<time>` (kept, not reused) with a
    warning naming the files, so that the run trains again on the current data. Returns the status of a run file that
    stays (read in the same pass), None when there is none or it was set aside."""
    if not path.exists():
        return None
    try:
        attrs = read_run(path).attrs  # read once: the caller's next read of it comes from memory
    except FileNotFoundError:  # set aside by another process since
        return None
    recorded, status = json.loads(attrs.get("data_files", "{}")), str(attrs.get("status"))
    changed = changed_files(settings.data_root(data_root), recorded) if recorded else []
    if not changed:
        return status
    aside = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process set it aside first
        return None
    log.warning("run %s was trained on other data: %s changed since (under the data root); the run file is kept as "
                "%s and the run trains again", path.stem, ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""),
                aside.name)
    return None


def _train(config: RunConfig, data_root, data: SettingData | None, path: Path | None, progress: bool) -> xr.Dataset:
    device = resolve_device(config.device)
    setting = settings.get(config.setting)
    root = settings.data_root(data_root)
    with recording_reads(root) as files:  # the data (and model) files the run reads, with their digests
        if data is None:
            data = setting.load(config.tasks, config.setting_options, root=data_root)
        trainer = Trainer(config, setting, data, device, data_root)
    checkpoint = path.with_suffix(".partial.pt") if path is not None else None
    trainer.ds.attrs["data_files"] = json.dumps(digests(root, files))
    if checkpoint is not None and checkpoint.exists():
        if _resume(trainer, checkpoint):
            log.info("resuming run %s from epoch %d", config.content_hash(), trainer.epoch)
        else:  # a fresh trainer: the failed load may have changed some of its state
            trainer = Trainer(config, setting, data, device, data_root)
            trainer.ds.attrs["data_files"] = json.dumps(digests(root, files))
    if path is not None:
        log.info("training run %s from epoch %d (host %s, pid %d)", config.content_hash(), trainer.epoch,
                 platform.node(), os.getpid())
    return trainer.fit(checkpoint=checkpoint, progress=progress)
