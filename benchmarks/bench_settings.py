"""Training steps of the CIFAR-100 and CelebA settings (ResNet18): speed and memory, against a plain PyTorch loop,
and CelebA's JPEG decoding (first load only); Cityscapes (DeepLabV3) and GLUE (the offline transformer encoder): the
steps' speed, memory and profile, and GLUE's trajectory factors against an epoch. A benchmark, not a test: nothing is
asserted. `--settings` chooses among cifar100, celeba, cityscapes and glue (default: all four).

No real CIFAR-100 or CelebA is needed: the script writes each setting's fixture files (`fixture.py`: small files in
exactly the released formats) into a temporary data root and loads them with the settings' own loaders. The images
are synthetic, but a step's cost depends only on the shapes (batch, image size, model width, tasks), which are the
real ones. For each setting it reports:

* samples/s of the trainer's step (`_timing.training_step`, batch drawing included) for STL (one task) and MTL
  (`--cifar-tasks` / `--celeba-tasks`) under the uniform update, and under one gradient-level SMTO (`upgrad` where
  registered, else `mgda`), whose step is timed alternately with the uniform one (median of per-repeat ratios);
* the peak memory of one step. CPU: each configuration runs in a fresh subprocess that builds the trainer, draws a
  batch, resets the process's peak resident set to its current one (Linux: `5` to `/proc/self/clear_refs`; importing
  torch alone peaks at ~0.75 GB), reads its resident set (VmRSS), runs one step and reads its peak resident set
  (VmHWM): the step's peak is that peak minus the RSS before it. It includes the gradients and the momentum buffers
  the first step creates. `getrusage(...).ru_maxrss` is not used: Linux carries the parent's peak over into a child
  across fork and exec (the child's ru_maxrss starts at the benchmark's own peak) and `clear_refs` does not lower it;
  tracemalloc does not see torch's allocator; the profiler's tensor counter misses allocator slack and non-tensor
  memory. CUDA: `torch.cuda.max_memory_allocated` over one step after a warm-up, minus the memory allocated before
  it;
* the trainer's uniform MTL step against a plain PyTorch loop over the same modules and the same batch (zero_grad,
  forward, the sum of the tasks' cross-entropies, backward, `torch.optim.SGD` with the run's lr and momentum, step; no
  mtlcore code): CIFAR-100 with one forward per task's batch (the textbook loop; BatchNorm then sees each task's
  batch on its own) and with one forward of the concatenated batches (the trainer's function); CelebA with the
  joint batch. Timed alternately (the order rotating per repeat); the target is the trainer within 10% of the plain
  loop. Both run the same kernels, so they differ only by per-step work that does not grow with the model: the
  comparison is repeated at a narrow width (`--plain-width`, 16), where that work is a larger part of a short, steady
  step and many repeats are cheap (width 64's steps take seconds and vary with the machine's load);
* the ops that dominate one uniform MTL step (`torch.profiler`, self time);
* CelebA: calls of the JPEG decoder (`mtlcore.settings.celeba.data.decode_image`, and `PIL.Image.open`) in a first
  load, a later load of the same sizes, and a 2-epoch `mtlcore.training.run`; the time of the first (decoding) load
  against a later (cached, memory-mapped) one.

Cityscapes: fixture files of 128×256 (`--cityscapes-images`, 16 training images: only the shapes matter), DeepLabV3
on a dilated ResNet18 (`--cityscapes-depth`; 50, the papers' size, with `--device cuda`) at full width, ASPP 256,
batch 8 (`--cityscapes-batch`). Samples/s of the STL steps (segmentation alone, depth alone), the uniform MTL step and
the SMTO step, the latter two alternated (median of per-pair ratios); the peak memory of each step (as above); the
ops that dominate each step (`torch.profiler`, self time).

GLUE: the real offline files (under the data root, `--data-root` or $MTLCORE_DATA_DIR) and the offline encoder
(all-MiniLM-L6-v2, found under the data root), batch 32 per task, max_length 128 (`--glue-batch`, `--max-length`),
Adam at lr 1e-4, summed losses, 256 training examples per task (`--glue-train-size`):

* tokens/s of an STL step (the first of `--glue-tasks`, sst2) and of the uniform MTL step (sst2 + cola): each timed
  step runs on a freshly drawn batch whose real tokens (the tokenizer's attention mask, no padding) are counted
  outside the timing; the median of the per-step rates;
* each trajectory factor (sharpness, fisher_trace, coherence) at one checkpoint, as the trainer measures it
  (`FactorSchedule.measure` with the run's model, data, tasks and update direction) on the first 64 examples of each
  task (`--factor-examples`; coherence's large batch is then 64, the per-example gradients in chunks of 8 as in the
  GLUE runs of the project's profiles), alternated with one training epoch of the same MTL run.

    .venv/bin/python benchmarks/bench_settings.py              # ~5–6 min on 2 CPU cores for CIFAR-100 and CelebA
    .venv/bin/python benchmarks/bench_settings.py --settings cityscapes,glue
    .venv/bin/python benchmarks/bench_settings.py --quick      # smaller models, fewer repeats: a check that it runs (~6 min)
    .venv/bin/python benchmarks/bench_settings.py --cifar-tasks all --width 64 --device cuda

Writes benchmarks/out/settings.md and settings.json (`settings-cuda.*` with `--device cuda`) and prints the tables.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _timing
from mtlcore import aggregators, settings
from mtlcore.metrics.schedule import FactorSchedule
from mtlcore.settings.celeba import data as celeba_data
from mtlcore.settings.celeba import fixture as celeba_fixture
from mtlcore.settings.cifar100 import data as cifar_data
from mtlcore.settings.cifar100 import fixture as cifar_fixture
from mtlcore.settings.glue.model import DEFAULT_ENCODER

OUT = Path(__file__).resolve().parent / "out"
MB = 2**20
SMTO = "upgrad" if "upgrad" in aggregators.available() else "mgda"
CIFAR_VAL, CIFAR_TEST_PER_CLASS = 16, 4


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


# -- data ----------------------------------------------------------------------------------------------------------
def celeba_sizes(n_images: int) -> dict[str, int]:
    """The fixture's partition sizes: every image of each partition."""
    codes = celeba_fixture.partition_codes(n_images)
    return {f"{split}_size": int((codes == code).sum()) for code, split in enumerate(("train", "val", "test"))}


def write_data(setting: str, root: Path, args) -> dict:
    """Fixture files of `setting` under the data root `root`; returns the setting options that load all of them."""
    if setting == "cifar100":
        train = max(args.batch, 64)
        per_class = math.ceil((train + CIFAR_VAL) / cifar_data.CLASSES_PER_TASK)
        cifar_fixture.write(root, train_per_class=per_class, test_per_class=CIFAR_TEST_PER_CLASS)
        return {"train_size": train, "val_size": CIFAR_VAL,
                "test_size": CIFAR_TEST_PER_CLASS * cifar_data.CLASSES_PER_TASK}
    n = max(args.celeba_images, math.ceil(args.batch * 5 / 3) + 5)  # train is 3/5 of the fixture's images
    celeba_fixture.write(root / "celeba", n_images=n)
    return {**celeba_sizes(n), "image_size": args.image_size}


def task_lists(setting: str, args) -> tuple[list[str], list[str]]:
    """(STL tasks, MTL tasks)."""
    every = list(cifar_data.TASKS if setting == "cifar100" else celeba_data.TASKS)
    wanted = args.cifar_tasks if setting == "cifar100" else args.celeba_tasks
    k = len(every) if wanted == "all" else int(wanted)
    return every[:1], every[:k]


def config(setting: str, tasks: list[str], aggregator: str, options: dict, args, **extra) -> dict:
    """A run config at the trainer's defaults (momentum SGD, lr 1e-2, summed losses, own heads)."""
    return {"setting": setting, "tasks": tasks, "batch_size": args.batch, "device": args.device,
            "aggregator": aggregator, "model_options": {"width": args.width}, "setting_options": options, **extra}


def samples(setting: str, tasks: list[str], batch: int) -> int:
    """Examples per step: a batch per task (multi-input), one batch of images for every task (single input)."""
    return batch * len(tasks) if setting == "cifar100" else batch


# -- the plain loop ------------------------------------------------------------------------------------------------
class PlainLoop:
    """The uniform MTL step without mtlcore: the trainer's modules, PyTorch's SGD, the sum of the cross-entropies.

    `joint`: multi-input only; one forward of the concatenated batches (the trainer's function) instead of one
    forward of encoder + head per task's batch."""

    def __init__(self, trainer, joint: bool = False):
        self.model, self.tasks, self.joint = trainer.model, list(trainer.tasks), joint
        c = trainer.config
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
        self.single_input = trainer.data.joint is not None

    def step(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        encoder, heads = self.model.encoder, self.model.heads
        if self.single_input:
            (inputs, targets), = batch
            features = encoder(inputs)
            loss = sum(F.cross_entropy(heads[t](features), targets[t]) for t in self.tasks)
        elif self.joint:
            features = encoder(torch.cat([x for x, _ in batch]))
            loss, start = 0, 0
            for task, (x, y) in zip(self.tasks, batch):
                loss = loss + F.cross_entropy(heads[task](features[start : start + len(x)]), y)
                start += len(x)
        else:
            loss = sum(F.cross_entropy(heads[t](encoder(x)), y) for t, (x, y) in zip(self.tasks, batch))
        loss.backward()
        self.optimizer.step()


# -- memory --------------------------------------------------------------------------------------------------------
def trainer_and_plain_loops(t, setting: str) -> dict:
    """On one fixed batch: the trainer's step, the plain loop, and (CIFAR-100) the plain loop of the joined batches."""
    batch = t._batch()
    loops = {"trainer": lambda: t.train_step(batch), "plain": (lambda plain: lambda: plain.step(batch))(PlainLoop(t))}
    if setting == "cifar100":
        loops["plain_joint"] = (lambda plain: lambda: plain.step(batch))(PlainLoop(t, joint=True))
    return loops


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(spec: dict) -> None:
    """In a fresh process: build the trainer, draw a batch, reset the peak resident set, one step; print the RSS
    before the step and the peak resident set (VmHWM) after it, in KiB."""
    torch.set_num_threads(spec["threads"])
    logging.getLogger("mtlcore").setLevel(logging.ERROR)
    trainer = _timing.trainer(spec["config"], spec["data_root"])
    trainer.model.train()
    batch = trainer._batch()
    plain = PlainLoop(trainer, joint=spec["kind"] == "plain_joint") if spec["kind"] != "trainer" else None
    gc.collect()
    try:  # Linux: set the peak resident set (VmHWM) to the current one (importing torch peaks above a small step)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss_before, peak_before = _status_kb("VmRSS"), _status_kb("VmHWM")
    if plain is None:
        trainer.train_step(batch)
    else:
        plain.step(batch)
    print(json.dumps({"rss_before_kb": rss_before, "peak_before_kb": peak_before, "peak_kb": _status_kb("VmHWM"),
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "reset": reset}))


def cpu_peak(cfg: dict, data_root: Path, kind: str, threads: int) -> dict:
    spec = {"config": cfg, "data_root": str(data_root), "kind": kind, "threads": threads}
    done = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent, check=False)
    if done.returncode:
        raise RuntimeError(f"memory subprocess failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # Without the reset the peak is the process's: the step's own is seen only where it exceeds the build's.
    masked = r["peak_kb"] <= r["peak_before_kb"] and r["peak_before_kb"] > r["rss_before_kb"] + 1024
    return {"before_mb": r["rss_before_kb"] / 1024, "peak_mb": r["peak_kb"] / 1024,
            "step_mb": (r["peak_kb"] - r["rss_before_kb"]) / 1024, "masked": masked, "peak_reset": r["reset"],
            "ru_maxrss_mb": r["ru_maxrss_kb"] / 1024}


def cuda_peak(step, device: torch.device) -> dict:
    _timing.sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    _timing.sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"before_mb": before / MB, "peak_mb": peak / MB, "step_mb": (peak - before) / MB, "masked": False}


# -- the profile ---------------------------------------------------------------------------------------------------
def profile_step(step, device: torch.device, top: int = 8) -> dict:
    """Self time of each op over one step (device time on CUDA), the `top` largest and the convolutions' share."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _timing.sync(device)
    events = prof.key_averages()

    def self_time(e):
        if device.type == "cuda":
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        return e.self_cpu_time_total

    total = sum(self_time(e) for e in events) or 1.0
    ranked = sorted(events, key=self_time, reverse=True)
    conv = sum(self_time(e) for e in events if "conv" in e.key.lower())
    batch_norm = sum(self_time(e) for e in events if "batch_norm" in e.key.lower())
    return {"total_ms": total / 1e3, "conv_share": conv / total, "batch_norm_share": batch_norm / total,
            "top": [{"op": e.key, "ms": self_time(e) / 1e3, "share": self_time(e) / total, "calls": e.count}
                    for e in ranked[:top]],
            "ops": {e.key: (self_time(e) / 1e3, e.count) for e in events}}


def distinct_ops(trainer: dict, plain: dict) -> dict:
    """The ops each of two profiled steps runs and the other does not (or runs a different number of times): their
    self time in each step, and the largest of them. The ops both run alike (the model's) are left out."""
    def only(a, b):
        ops = {k: v for k, v in a.items() if b.get(k, (0.0, 0))[1] != v[1] and not k.startswith("ProfilerStep")}
        return {"ms": sum(ms for ms, _ in ops.values()),
                "top": sorted(((k, ms, n) for k, (ms, n) in ops.items()), key=lambda x: -x[1])[:6]}

    return {"trainer": only(trainer["ops"], plain["ops"]), "plain": only(plain["ops"], trainer["ops"])}


def with_rusage(fn, into: list):
    """fn, appending to `into` the system CPU seconds and the minor page faults of each call."""
    def run():
        before = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF)
        into.append((after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    return run


def narrow_comparison(setting: str, tasks: list[str], options: dict, data, args) -> dict:
    """The trainer's uniform MTL step against the plain loops at ResNet width `--plain-width`, many repeats.

    The two run the same kernels on the same batch; what differs is per-step work independent of the width (Python,
    small tensors, the optimizer's kind). A narrow model makes that part of the step larger, and its step short and
    steady enough for many repeats: a bound for the full width, whose seconds-long steps vary with the machine's
    load."""
    narrow = argparse.Namespace(**{**vars(args), "width": args.plain_width})
    t = _timing.trainer(config(setting, tasks, "uniform", options, narrow), data=data)
    t.model.train()
    loops = trainer_and_plain_loops(t, setting)
    for fn in loops.values():
        for _ in range(2):
            fn()
    device = torch.device(args.device)
    rows = _timing.alternated(loops, device, args.plain_repeats, args.steps)
    return {"width": args.plain_width, "s": {name: _timing.median_seconds(rows, name) for name in loops},
            "ratio": {name: _timing.median_ratio(rows, "trainer", name) for name in loops if name != "trainer"},
            "rows": rows}


# -- one setting ---------------------------------------------------------------------------------------------------
def bench_setting(setting: str, work: Path, args) -> dict:
    device = torch.device(args.device)
    root = work / setting
    options = write_data(setting, root, args)
    stl_tasks, mtl_tasks = task_lists(setting, args)
    setting_obj = settings.get(setting)
    data = {len(t): setting_obj.load(t, options, root=root) for t in (stl_tasks, mtl_tasks)}
    result = {"options": options, "width": args.width, "stl_tasks": len(stl_tasks), "mtl_tasks": len(mtl_tasks),
              "stl_samples": samples(setting, stl_tasks, args.batch),
              "mtl_samples": samples(setting, mtl_tasks, args.batch)}

    def trainer(tasks, aggregator):
        t = _timing.trainer(config(setting, tasks, aggregator, options, args), data=data[len(tasks)])
        t.model.train()
        return t

    def step_of(t):
        return lambda: _timing.training_step(t)

    # STL, uniform.
    stl = trainer(stl_tasks, "uniform")
    step_of(stl)()  # warm-up
    rows = _timing.alternated({"stl": step_of(stl)}, device, args.repeats, args.steps)
    result["stl_s"] = _timing.median_seconds(rows, "stl")
    log(f"{setting}: STL step {1e3 * result['stl_s']:.0f} ms")
    stl_cfg = stl.config
    del stl
    gc.collect()

    # MTL uniform: the trainer against the plain loop(s) on one fixed batch, alternated.
    uniform = trainer(mtl_tasks, "uniform")
    loops = trainer_and_plain_loops(uniform, setting)
    for fn in loops.values():
        fn()  # warm-up (the optimizers' momentum buffers)
    kernel = {name: [] for name in loops}  # per step: system seconds and minor page faults (getrusage)
    rows = _timing.alternated({name: with_rusage(fn, kernel[name]) for name, fn in loops.items()}, device,
                              args.repeats, args.steps)
    result["plain_kernel"] = {name: {"sys_s": statistics.median(x for x, _ in v),
                                     "minor_faults": statistics.median(y for _, y in v)} for name, v in kernel.items()}
    result["plain"] = {name: _timing.median_seconds(rows, name) for name in loops}
    result["plain_ratio"] = {name: _timing.median_ratio(rows, "trainer", name) for name in loops if name != "trainer"}
    result["plain_rows"] = rows
    result["draw_s"] = _timing.seconds(uniform._batch, device, 20)
    log(f"{setting}: trainer vs plain {result['plain']} ratios {result['plain_ratio']}")
    if args.plain_width and args.plain_width != args.width:
        result["plain_narrow"] = narrow_comparison(setting, mtl_tasks, options, data[len(mtl_tasks)], args)
        log(f"{setting}: width {args.plain_width}: trainer vs plain {result['plain_narrow']['ratio']}")

    # The SMTO step against the uniform step (both drawing their batches), alternated.
    smto = trainer(mtl_tasks, SMTO)
    step_of(smto)()  # warm-up
    rows = _timing.alternated({"smto": step_of(smto), "uniform": step_of(uniform)}, device, args.smto_repeats, 1)
    result["smto_s"] = _timing.median_seconds(rows, "smto")
    result["uniform_s"] = _timing.median_seconds(rows, "uniform")
    result["smto_ratio"] = _timing.median_ratio(rows, "smto", "uniform")
    result["smto_rows"] = rows
    log(f"{setting}: {SMTO} {result['smto_s']:.2f} s, uniform {result['uniform_s']:.2f} s, "
        f"ratio {result['smto_ratio']:.2f}")

    # What dominates the uniform MTL step.
    if not args.no_profile:
        result["profile"] = profile_step(loops["trainer"], device)
        same_function = "plain_joint" if setting == "cifar100" else "plain"
        plain_profile = profile_step(loops[same_function], device)
        result["profile"]["plain_ms"] = plain_profile["total_ms"]
        result["profile"]["distinct"] = distinct_ops(result["profile"], plain_profile)
        log(f"{setting}: profile top {result['profile']['top'][:3]}, distinct {result['profile']['distinct']}")
    if args.profile_smto:
        result["profile_smto"] = profile_step(step_of(smto), device)
        log(f"{setting}: {SMTO} profile top {result['profile_smto']['top'][:3]}")

    # Peak memory of one step.
    if not args.no_memory:
        configs = {"STL uniform": (stl_cfg, "trainer"), "MTL uniform": (uniform.config, "trainer"),
                   f"MTL {SMTO}": (smto.config, "trainer")}
        if args.memory_plain:
            label = "plain loop" if setting == "celeba" else "plain loop, per-task forwards"
            configs[label] = (uniform.config, "plain")
            if setting == "cifar100":
                configs["plain loop, joint forward"] = (uniform.config, "plain_joint")
        memory = {}
        if device.type == "cuda":
            stl = trainer(stl_tasks, "uniform")
            step_of(stl)()
            memory["STL uniform"] = cuda_peak(step_of(stl), device)
            memory["MTL uniform"] = cuda_peak(loops["trainer"], device)
            memory[f"MTL {SMTO}"] = cuda_peak(step_of(smto), device)
            for label, (_, kind) in configs.items():
                if kind != "trainer":
                    memory[label] = cuda_peak(loops[kind], device)
        else:
            del smto, uniform, loops
            gc.collect()
            for label, (cfg, kind) in configs.items():
                memory[label] = cpu_peak(cfg.to_dict(), root, kind, args.threads)
                log(f"{setting}: memory {label} {memory[label]}")
        result["memory"] = memory
    return result


# -- CelebA's JPEGs ------------------------------------------------------------------------------------------------
class Counter:
    """Counts calls of a module attribute (thread-safe: the loader decodes in a thread pool) while installed."""

    def __init__(self, module, name: str):
        self.module, self.name, self.original, self.calls = module, name, getattr(module, name), 0
        self.lock = threading.Lock()

    def __enter__(self):
        original = self.original

        def counted(*a, **k):
            with self.lock:
                self.calls += 1
            return original(*a, **k)

        setattr(self.module, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def jpeg_check(work: Path, args) -> dict:
    import PIL.Image

    from mtlcore.training import Trainer, run

    setting = settings.get("celeba")
    tasks = list(celeba_data.TASKS)
    n = max(args.celeba_images, math.ceil(args.batch * 5 / 3) + 5)
    options = {**celeba_sizes(n), "image_size": args.image_size}
    loads = []
    with Counter(celeba_data, "decode_image") as decodes, Counter(PIL.Image, "open") as opens:
        def counts():
            return decodes.calls, opens.calls

        for r in range(args.jpeg_repeats):  # each repeat on fresh files: its first load finds no cache
            root = work / f"celeba_jpeg_{r}"
            celeba_fixture.write(root / "celeba", n_images=n, seed=r)
            row = {}
            for label in ("first", "later"):
                celeba_data._lists.cache_clear()  # as a new process: both loads read the two list files
                gc.collect()
                c0, start = counts(), time.perf_counter()
                loaded = setting.load(tasks, options, root=root)
                seconds, c1 = time.perf_counter() - start, counts()
                row[label] = {"s": seconds, "decodes": c1[0] - c0[0], "opens": c1[1] - c0[1],
                              "images": loaded.joint["train"].inputs["images"]}
            row["same_images"] = bool(torch.equal(row["first"].pop("images"), row["later"].pop("images")))
            loads.append(row)
            log(f"celeba JPEG load {r}: {row}")

        # 2-epoch runs: on fresh files (the run's own load decodes), then again on the same files.
        epochs, original = [], Trainer._train_epoch

        def counted_epoch(self, bar):
            before = counts()
            original(self, bar)
            after = counts()
            epochs.append((before, after))

        run_root = work / "celeba_run"
        celeba_fixture.write(run_root / "celeba", n_images=n)
        runs = []
        Trainer._train_epoch = counted_epoch
        try:
            for label in ("fresh files", "cached"):
                epochs.clear()
                c0 = counts()
                start = time.perf_counter()
                run({"setting": "celeba", "tasks": tasks, "batch_size": args.batch, "epochs": 2, "device": "cpu",
                     "model_options": {"width": args.jpeg_width}, "setting_options": options}, data_root=run_root,
                    progress=False)
                c1 = counts()
                runs.append({"run": label, "s": time.perf_counter() - start,
                             "before_epoch_1": epochs[0][0][0] - c0[0],
                             "epochs": [after[0] - before[0] for before, after in epochs],
                             "after_epoch_1": c1[0] - epochs[0][0][0], "total": c1[0] - c0[0],
                             "opens_total": c1[1] - c0[1]})
                log(f"celeba JPEG run: {runs[-1]}")
        finally:
            Trainer._train_epoch = original
    return {"images": n, "options": options, "loads": loads, "runs": runs}


# -- Cityscapes ----------------------------------------------------------------------------------------------------
CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH, CITYSCAPES_VAL, CITYSCAPES_TEST = 128, 256, 2, 2


def cityscapes_config(tasks: list[str], aggregator: str, options: dict, args) -> dict:
    """DeepLabV3 (dilated ResNet `--cityscapes-depth`, full width) at the trainer's defaults (momentum SGD, lr 1e-2,
    summed losses, own heads)."""
    return {"setting": "cityscapes", "tasks": tasks, "batch_size": args.cityscapes_batch, "device": args.device,
            "aggregator": aggregator, "model": "deeplabv3", "setting_options": options,
            "model_options": {"depth": args.cityscapes_depth, "width": args.cityscapes_width,
                              "aspp_channels": args.aspp_channels}}


def bench_cityscapes(work: Path, args) -> dict:
    """Samples/s of the STL steps (segmentation, depth) and the uniform MTL step, the SMTO step alternated with the
    uniform one, the peak memory and the profile of each step, on fixture files of 128×256."""
    from mtlcore.settings.cityscapes import data as cityscapes_data
    from mtlcore.settings.cityscapes import fixture as cityscapes_fixture

    device = torch.device(args.device)
    root = work / "cityscapes"
    train = args.cityscapes_images
    cityscapes_fixture.write(root, train=train + CITYSCAPES_VAL, val=CITYSCAPES_TEST, height=CITYSCAPES_HEIGHT,
                             width=CITYSCAPES_WIDTH)
    options = {"train_size": train, "val_size": CITYSCAPES_VAL, "test_size": CITYSCAPES_TEST}
    every = list(cityscapes_data.TASKS)
    setting_obj = settings.get("cityscapes")
    data = setting_obj.load(every, options, root=root)  # single input: one load serves every task subset
    result = {"options": options, "batch": args.cityscapes_batch, "depth": args.cityscapes_depth,
              "width": args.cityscapes_width, "aspp_channels": args.aspp_channels, "steps": {}, "profiles": {},
              "memory": {}}

    def trainer(tasks, aggregator):
        t = _timing.trainer(cityscapes_config(tasks, aggregator, options, args), data=data)
        t.model.train()
        return t

    def step_of(t):
        return lambda: _timing.training_step(t)

    configs = {}
    for label, tasks in (("STL segmentation", ["segmentation"]), ("STL depth", ["depth"])):
        t = trainer(tasks, "uniform")
        step_of(t)()  # warm-up (momentum buffers)
        rows = _timing.alternated({label: step_of(t)}, device, args.cityscapes_repeats, args.steps)
        result["steps"][label] = {"s": _timing.median_seconds(rows, label), "rows": rows}
        log(f"cityscapes: {label} step {1e3 * result['steps'][label]['s']:.0f} ms")
        if not args.no_profile:
            result["profiles"][label] = profile_step(step_of(t), device, top=args.top)
        configs[label] = t.config
        del t
        gc.collect()

    uniform, smto = trainer(every, "uniform"), trainer(every, SMTO)
    step_of(uniform)()
    step_of(smto)()
    rows = _timing.alternated({"smto": step_of(smto), "uniform": step_of(uniform)}, device,
                              args.cityscapes_smto_repeats, 1)
    result["steps"]["MTL uniform"] = {"s": _timing.median_seconds(rows, "uniform"), "rows": rows}
    result["steps"][f"MTL {SMTO}"] = {"s": _timing.median_seconds(rows, "smto"), "rows": rows,
                                      "ratio": _timing.median_ratio(rows, "smto", "uniform")}
    log(f"cityscapes: uniform {result['steps']['MTL uniform']['s']:.2f} s, {SMTO} "
        f"{result['steps'][f'MTL {SMTO}']['s']:.2f} s, ratio {result['steps'][f'MTL {SMTO}']['ratio']:.2f}")
    result["draw_s"] = _timing.seconds(uniform._batch, device, 10)
    if not args.no_profile:
        result["profiles"]["MTL uniform"] = profile_step(step_of(uniform), device, top=args.top)
        result["profiles"][f"MTL {SMTO}"] = profile_step(step_of(smto), device, top=args.top)
        for label, p in result["profiles"].items():
            log(f"cityscapes: profile {label}: {[(e['op'], round(e['share'], 3)) for e in p['top'][:4]]}")
    configs["MTL uniform"], configs[f"MTL {SMTO}"] = uniform.config, smto.config

    if not args.no_memory:
        if device.type == "cuda":
            for label, cfg in configs.items():
                t = uniform if label == "MTL uniform" else smto if label == f"MTL {SMTO}" else None
                if t is None:
                    t = trainer(list(cfg.tasks), "uniform")
                    step_of(t)()
                result["memory"][label] = cuda_peak(step_of(t), device)
        else:
            del uniform, smto
            gc.collect()
            for label, cfg in configs.items():
                result["memory"][label] = cpu_peak(cfg.to_dict(), root, "trainer", args.threads)
                log(f"cityscapes: memory {label} {result['memory'][label]}")
    for p in result["profiles"].values():
        p.pop("ops", None)
    return result


# -- GLUE ----------------------------------------------------------------------------------------------------------
def glue_config(tasks: list[str], options: dict, args, metrics: dict | None = None) -> dict:
    """The offline encoder at `--max-length`, Adam at lr 1e-4 (the GLUE runs of the project's profiles), summed
    losses, uniform update."""
    return {"setting": "glue", "tasks": tasks, "batch_size": args.glue_batch, "device": args.device,
            "aggregator": "uniform", "model": "transformer", "optimizer": "adam", "lr": 1e-4, "loss_scale": "sum",
            "setting_options": options, "model_options": {"max_length": args.max_length},
            **({"metrics": metrics} if metrics else {})}


def glue_tokens(t, batch) -> tuple[int, int]:
    """(real tokens, token positions the encoder runs) of a step's batch: the tokenizer's attention mask summed, and
    every row padded to the step's longest example (the trainer joins the tasks' batches into one forward)."""
    real, rows, longest = 0, 0, 0
    for x, _ in batch:
        _, _, mask = t.model.encoder.tokenize(x["text_a"], x["text_b"], x["pair"])
        real, rows, longest = real + int(mask.sum()), rows + mask.shape[0], max(longest, mask.shape[1])
    return real, rows * longest


def bench_glue(args) -> dict:
    """Tokens/s of the STL and MTL uniform steps on the real offline files, and each trajectory factor at one
    checkpoint against one training epoch, alternated."""
    device = torch.device(args.device)
    mtl_tasks = args.glue_tasks.split(",")
    stl_tasks = mtl_tasks[:1]
    options = {"train_size": args.glue_train_size, "val_size": 8, "test_size": 8, "data_seed": 0}
    setting_obj = settings.get("glue")
    data = {len(t): setting_obj.load(t, options, root=args.data_root) for t in (stl_tasks, mtl_tasks)}
    result = {"options": options, "stl_tasks": stl_tasks, "mtl_tasks": mtl_tasks, "batch": args.glue_batch,
              "max_length": args.max_length, "steps": {}, "factors": {}, "profiles": {}}

    # Tokens/s: each repeat draws a batch (not timed), counts its tokens and times one step on it.
    for label, tasks in ((f"STL {stl_tasks[0]}", stl_tasks), (f"MTL uniform ({' + '.join(mtl_tasks)})", mtl_tasks)):
        t = _timing.trainer(glue_config(tasks, options, args), args.data_root, data=data[len(tasks)])
        t.model.train()
        t.train_step()  # warm-up (Adam's state, the tokenizer's cache)
        rows = []
        for _ in range(args.glue_repeats):
            batch = t._batch()
            real, positions = glue_tokens(t, batch)
            s = _timing.seconds(lambda t=t, b=batch: t.train_step(b), device)
            rows.append({"s": s, "tokens": real, "positions": positions, "examples": sum(len(y) for _, y in batch)})
        result["steps"][label] = {
            "s": statistics.median(r["s"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens"] / r["s"] for r in rows),
            "positions_per_s": statistics.median(r["positions"] / r["s"] for r in rows),
            "tokens": statistics.mean(r["tokens"] for r in rows),
            "positions": statistics.mean(r["positions"] for r in rows),
            "examples": rows[0]["examples"], "rows": rows}
        if not args.no_profile:
            batch = t._batch()
            profile = profile_step(lambda t=t, b=batch: t.train_step(b), device, top=args.top)
            profile.pop("ops", None)
            profile["tokens"], profile["positions"] = glue_tokens(t, batch)
            result["profiles"][label] = profile
            log(f"glue: profile {label}: {[(e['op'], round(e['share'], 3)) for e in profile['top'][:4]]}")
        log(f"glue: {label}: {result['steps'][label]['s']:.2f} s, {result['steps'][label]['tokens_per_s']:,.0f} "
            f"tokens/s")
        del t
        gc.collect()

    # Factors at one checkpoint against one epoch: the schedule's `measure`, as the trainer calls it at a record.
    t = _timing.trainer(glue_config(mtl_tasks, options, args), args.data_root, data=data[len(mtl_tasks)])
    t.model.train()
    t.train_step()
    steps = t.steps_per_epoch
    result["epoch_steps"] = steps

    def epoch():
        t.model.train()
        for _ in range(steps):
            t.train_step()

    metrics_options = {"examples": args.factor_examples, "coherence": {"large_batch": args.factor_examples,
                                                                      "chunk_size": args.factor_chunk},
                       "fisher_trace": {"chunk_size": args.factor_chunk}}
    result["metrics_options"] = metrics_options
    for factor in [f for f in args.glue_factors.split(",") if f]:
        schedule = FactorSchedule({"factors": [factor], **metrics_options}, t.config.seed, t.config.batch_size,
                                  t.config.loss_scale)

        def measure(schedule=schedule):
            t.model.eval()  # as at the trainer's record (after `evaluate`)
            schedule.measure(t.model, t.data, t.specs, 0, t.update.direction())

        if factor != "sharpness":  # warm-up (per-example gradients under vmap; sharpness runs the epoch's kernels)
            measure()
        rows = _timing.alternated({"factor": measure, "epoch": epoch}, device, args.factor_repeats, 1)
        result["factors"][factor] = {"s": _timing.median_seconds(rows, "factor"),
                                     "epoch_s": _timing.median_seconds(rows, "epoch"),
                                     "ratio": _timing.median_ratio(rows, "factor", "epoch"), "rows": rows}
        log(f"glue: {factor} {result['factors'][factor]['s']:.2f} s, epoch {result['factors'][factor]['epoch_s']:.2f}"
            f" s, ratio {result['factors'][factor]['ratio']:.2f}")
    return result


def cityscapes_section(r: dict, args) -> str:
    device = torch.device(args.device)
    o = r["options"]
    memory_column = "step's peak RSS (MB)" if args.device == "cpu" else "step's peak allocated (MB)"
    lines = [f"| step | step (ms) | samples/s | step / uniform MTL | {memory_column} |", "|---|---:|---:|---:|---:|"]
    for label, s in r["steps"].items():
        m = r["memory"].get(label)
        mem = "not measured" if m is None else f"{'≥ ' if m['masked'] else ''}{m['step_mb']:,.0f}"
        ratio = s.get("ratio", 1.0 if label == "MTL uniform" else None)
        lines.append(f"| {label} | {1e3 * s['s']:,.0f} | {r['batch'] / s['s']:,.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} | {mem} |")
    head = (f"# Cityscapes\n\nMeasured {time.strftime('%Y-%m-%d')}, {_timing.machine(device)}, {os.cpu_count()} "
            f"cores, torch.set_num_threads({args.threads}), torch {torch.__version__}, device {args.device}; "
            f"DeepLabV3, dilated ResNet{r['depth']} width {r['width']}, ASPP {r['aspp_channels']} channels; batch "
            f"{r['batch']} images of {CITYSCAPES_HEIGHT}×{CITYSCAPES_WIDTH}; fixture files ({o['train_size']} "
            f"training images, synthetic, in the released layout). STL: {args.cityscapes_repeats} repeat(s) of "
            f"{args.steps} step(s); MTL uniform and {SMTO}: {args.cityscapes_smto_repeats} alternated pair(s) after a "
            f"warm-up step each (the ratio is the median of the per-pair ratios). Drawing a batch takes "
            f"{1e3 * r['draw_s']:.2f} ms (included in each step).")
    sections = [head, "## Training steps\n\n" + "\n".join(lines)]
    if r["memory"]:
        sections.append("## Peak memory of one step\n\n" + memory_table({"cityscapes": r}))
    if r["profiles"]:
        rows = ["| step | op | self time (ms) | share of the step | calls |", "|---|---|---:|---:|---:|"]
        notes = []
        for label, p in r["profiles"].items():
            for e in p["top"]:
                rows.append(f"| {label} | `{e['op']}` | {e['ms']:,.1f} | {100 * e['share']:.1f}% | {e['calls']} |")
            notes.append(f"- {label}: convolution ops {100 * p['conv_share']:.0f}% of the step's self time, batch "
                         f"norm {100 * p['batch_norm_share']:.0f}% (profiled step {p['total_ms']:,.0f} ms).")
        sections.append("## What dominates a step (torch.profiler, self time)\n\n" + "\n".join(rows + [""] + notes))
    return "\n\n".join(sections)


def glue_section(r: dict, args) -> str:
    device = torch.device(args.device)
    o = r["options"]
    lines = [("| step | examples / step | real tokens / step (mean) | padded positions / step (mean) | step (ms) | "
              "tokens/s (real) | positions/s |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in r["steps"].items():
        lines.append(f"| {label} | {s['examples']} | {s['tokens']:,.0f} | {s['positions']:,.0f} | "
                     f"{1e3 * s['s']:,.0f} | {s['tokens_per_s']:,.0f} | {s['positions_per_s']:,.0f} |")
    head = (f"# GLUE\n\nMeasured {time.strftime('%Y-%m-%d')}, {_timing.machine(device)}, {os.cpu_count()} cores, "
            f"torch.set_num_threads({args.threads}), torch {torch.__version__}, device {args.device}; the offline "
            f"encoder ({DEFAULT_ENCODER}), max_length {r['max_length']}, batch {r['batch']} per task, Adam lr 1e-4, "
            f"summed losses; the real GLUE files, {o['train_size']} training examples per task. Tokens/s: "
            f"{args.glue_repeats} steps, each on a freshly drawn batch whose real (non-padding) tokens are counted "
            f"with the model's tokenizer; the median of the per-step rates. Padded positions: every row at the "
            f"step's longest example (the trainer joins the tasks' batches into one forward).")
    f_lines = ["| factor | one checkpoint (s) | one epoch (s) | checkpoint / epoch |", "|---|---:|---:|---:|"]
    for name, f in r["factors"].items():
        f_lines.append(f"| {name} | {f['s']:.2f} | {f['epoch_s']:.2f} | {f['ratio']:.2f} |")
    m = r["metrics_options"]
    f_note = (f"{' + '.join(r['mtl_tasks'])}, uniform MTL; one epoch = {r['epoch_steps']} steps of {r['batch']} "
              f"examples per task; each factor is `FactorSchedule.measure` as the trainer calls it at a record, on the "
              f"first {m['examples']} training examples of each task, the project's defaults otherwise "
              f"(sharpness: ρ 1e-3, 20 ascent steps, batch 128; Fisher trace: the true Fisher; coherence: small batch "
              f"16, large batch {m['examples']}, and the multi-task coherence), with per-example gradients in chunks "
              f"of {args.factor_chunk} examples; {args.factor_repeats} alternated pairs (after a warm-up measurement "
              f"for the Fisher trace and coherence), the ratio "
              f"the median of the per-pair ratios.")
    sections = [head, "## Training steps\n\n" + "\n".join(lines)]
    if r.get("profiles"):
        rows = ["| step | op | self time (ms) | share of the step | calls |", "|---|---|---:|---:|---:|"]
        for label, p in r["profiles"].items():
            for e in p["top"]:
                rows.append(f"| {label} | `{e['op']}` | {e['ms']:,.1f} | {100 * e['share']:.1f}% | {e['calls']} |")
        notes = [f"- {label}: profiled step {p['total_ms']:,.0f} ms on a batch of {p['tokens']:,} real tokens in "
                 f"{p['positions']:,} positions." for label, p in r["profiles"].items()]
        sections.append("## What dominates a step (torch.profiler, self time)\n\n" + "\n".join(rows + [""] + notes))
    if r["factors"]:
        sections.append("## Trajectory factors at one checkpoint against one training epoch\n\n" + "\n".join(f_lines)
                        + "\n\n" + f_note)
    return "\n\n".join(sections)


# -- report --------------------------------------------------------------------------------------------------------
NAMES = {"cifar100": "CIFAR-100", "celeba": "CelebA", "cityscapes": "Cityscapes", "glue": "GLUE"}
IMAGE_SETTINGS = ("cifar100", "celeba")


def throughput_table(results: dict, args) -> str:
    memory_column = "step's peak RSS (MB)" if args.device == "cpu" else "step's peak allocated (MB)"
    lines = [(f"| setting | step | tasks | examples / step | step (ms) | samples/s | step / uniform MTL | "
              f"{memory_column} |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for setting, r in results.items():
        memory = r.get("memory", {})

        def mem(label, memory=memory):
            m = memory.get(label)
            if m is None:
                return "not measured"
            return f"{'≥ ' if m['masked'] else ''}{m['step_mb']:,.0f}"

        rows = [("STL uniform", r["stl_tasks"], r["stl_samples"], r["stl_s"], None),
                ("MTL uniform", r["mtl_tasks"], r["mtl_samples"], r["plain"]["trainer"] + r["draw_s"], 1.0),
                (f"MTL {SMTO}", r["mtl_tasks"], r["mtl_samples"], r["smto_s"], r["smto_ratio"])]
        for label, k, n, s, ratio in rows:
            lines.append(f"| {NAMES[setting]} | {label} | {k} | {n} | {1e3 * s:,.0f} | {n / s:,.1f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} | {mem(label)} |")
    return "\n".join(lines)


def memory_table(results: dict) -> str:
    lines = ["| setting | step | RSS before the step (MB) | peak RSS (MB) | step's peak above it (MB) |",
             "|---|---|---:|---:|---:|"]
    for setting, r in results.items():
        for label, m in r.get("memory", {}).items():
            lines.append(f"| {NAMES[setting]} | {label} | {m['before_mb']:,.0f} | {m['peak_mb']:,.0f} | "
                         f"{'≥ ' if m['masked'] else ''}{m['step_mb']:,.0f} |")
    return "\n".join(lines)


def plain_table(results: dict) -> str:
    lines = [("| setting | width | plain loop | repeats | trainer step (ms) | plain step (ms) | trainer / plain | "
              "per-repeat ratios (min–max) | within 10% |"), "|---|---:|---|---:|---:|---:|---:|---|---|"]
    labels = {"plain": "one forward per task's batch", "plain_joint": "one forward of the joined batches"}
    for setting, r in results.items():
        runs = [(r["width"], r["plain"], r["plain_ratio"], r["plain_rows"])]
        if "plain_narrow" in r:
            n = r["plain_narrow"]
            runs.append((n["width"], n["s"], n["ratio"], n["rows"]))
        for width, s, ratios, rows in runs:
            for name, ratio in ratios.items():
                label = "the joint batch" if setting == "celeba" else labels[name]
                each = [row["trainer"] / row[name] for row in rows]
                lines.append(f"| {NAMES[setting]} | {width} | {label} | {len(rows)} | {1e3 * s['trainer']:,.0f} | "
                             f"{1e3 * s[name]:,.0f} | {ratio:.3f} | {min(each):.2f}–{max(each):.2f} | "
                             f"{'yes' if ratio <= 1.10 else 'no'} |")
    names = {"trainer": "trainer", "plain": "plain loop", "plain_joint": "plain loop, joined batches"}
    notes = [f"- {NAMES[s]}, width {r['width']}, per step (median): " + "; ".join(
        f"{names[n] if s == 'cifar100' or n != 'plain' else 'plain loop'} {k['sys_s']:.2f} s of system time, "
        f"{k['minor_faults']:,.0f} minor page faults" for n, k in r["plain_kernel"].items()) + "."
        for s, r in results.items() if "plain_kernel" in r]
    return "\n".join(lines + [""] + notes)


def profile_table(results: dict) -> str:
    lines = ["| setting | step | op | self time (ms) | share of the step | calls |", "|---|---|---|---:|---:|---:|"]
    for setting, r in results.items():
        for key, label in (("profile", "MTL uniform"), ("profile_smto", f"MTL {SMTO}")):
            p = r.get(key)
            if p is None:
                continue
            for e in p["top"]:
                lines.append(f"| {NAMES[setting]} | {label} | `{e['op']}` | {e['ms']:,.1f} | {100 * e['share']:.1f}% | "
                             f"{e['calls']} |")
    notes = []
    for s, r in results.items():
        if "profile" not in r:
            continue
        p, d = r["profile"], r["profile"]["distinct"]

        def listing(side, d=d):
            return ", ".join(f"`{k}` {ms:.1f} ms ×{n}" for k, ms, n in d[side]["top"]) or "none"

        notes.append(f"- {NAMES[s]}: convolution ops (forward and backward) {100 * p['conv_share']:.0f}% of the "
                     f"step's self time, batch norm {100 * p['batch_norm_share']:.0f}% (profiled step "
                     f"{p['total_ms']:,.0f} ms; the plain loop's {p['plain_ms']:,.0f} ms). Ops only the trainer's "
                     f"step runs (or runs a different number of times): {d['trainer']['ms']:.1f} ms in all, "
                     f"largest {listing('trainer')}; "
                     f"only the plain loop's{' (joined batches)' if s == 'cifar100' else ''}: {d['plain']['ms']:.1f} "
                     f"ms, largest {listing('plain')}.")
    return "\n".join(lines + [""] + notes)


def jpeg_table(j: dict) -> str:
    first = [row["first"] for row in j["loads"]]
    later = [row["later"] for row in j["loads"]]
    ratio = statistics.median(f["s"] / l["s"] for f, l in zip(first, later))
    lines = ["| what | JPEG decodes | `PIL.Image.open` calls | wall time (s) |", "|---|---:|---:|---:|",
             (f"| first load (decodes, writes the uint8 cache) | {', '.join(str(f['decodes']) for f in first)} | "
              f"{', '.join(str(f['opens']) for f in first)} | {statistics.median(f['s'] for f in first):.3f} |"),
             (f"| later load, same sizes (memory-mapped cache) | {', '.join(str(l['decodes']) for l in later)} | "
              f"{', '.join(str(l['opens']) for l in later)} | {statistics.median(l['s'] for l in later):.3f} |")]
    for r in j["runs"]:
        lines.append(f"| 2-epoch `mtlcore.training.run`, {r['run']}: its load / epoch 1 / epoch 2 | "
                     f"{r['before_epoch_1']} / {' / '.join(str(e) for e in r['epochs'])} | {r['opens_total']} in all | "
                     f"{r['s']:.1f} |")
    same = all(row["same_images"] for row in j["loads"])
    note = (f"- {j['images']} fixture images (178×218 JPEGs) to {j['options']['image_size']}², "
            f"{len(j['loads'])} fresh copies; the load times are medians. First / later load: "
            f"{ratio:.1f}× (median of the per-copy ratios). The later load returned the same "
            f"training images: {'yes' if same else 'NO'}.")
    return "\n".join(lines + ["", note])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="cifar100,celeba,cityscapes,glue",
                        help="comma-separated: cifar100, celeba, cityscapes, glue (default: all four)")
    parser.add_argument("--width", type=int, default=None, help="ResNet18's width (default 64, the real one)")
    parser.add_argument("--batch", type=int, default=32, help="batch per task (CIFAR-100), per step (CelebA)")
    parser.add_argument("--cifar-tasks", default="4", help="MTL tasks of CIFAR-100: a number or all (20)")
    parser.add_argument("--celeba-tasks", default="all", help="MTL attributes of CelebA: a number or all (40)")
    parser.add_argument("--image-size", type=int, default=64, help="CelebA's image_size")
    parser.add_argument("--repeats", type=int, default=None, help="alternated repeats: STL, trainer vs plain (4)")
    parser.add_argument("--smto-repeats", type=int, default=None, help=f"alternated repeats of {SMTO} vs uniform (2; "
                        "its step takes 10–30 s at width 64)")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--plain-width", type=int, default=None, help="also compare the trainer with the plain loop "
                        "at this narrower width, with --plain-repeats repeats (16; 0: no)")
    parser.add_argument("--plain-repeats", type=int, default=None, help="repeats at --plain-width (10)")
    parser.add_argument("--celeba-images", type=int, default=None, help="CelebA fixture images (500)")
    parser.add_argument("--jpeg-repeats", type=int, default=3, help="fresh copies for the first-load timing")
    parser.add_argument("--jpeg-width", type=int, default=8, help="ResNet width of the 2-epoch runs (decodes only)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-plain", action="store_true", help="also the peak memory of the plain loops' step")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-jpeg", action="store_true")
    parser.add_argument("--profile-smto", action="store_true", help=f"also profile one {SMTO} step")
    parser.add_argument("--quick", action="store_true", help="width 16 (the plain-loop bound at 8), 2, 1 and 4 "
                        "repeats, 120 CelebA images; Cityscapes at width 8; GLUE at batch 8, max_length 64, 64 "
                        "examples per task, factors on 32")
    parser.add_argument("--cityscapes-batch", type=int, default=8, help="Cityscapes' batch (images of 128×256)")
    parser.add_argument("--cityscapes-depth", type=int, default=None, help="the backbone's ResNet depth (18; 50 "
                        "with --device cuda, the papers' size)")
    parser.add_argument("--cityscapes-width", type=int, default=None, help="the backbone's width (64, the real one)")
    parser.add_argument("--aspp-channels", type=int, default=None, help="the ASPP heads' channels (256)")
    parser.add_argument("--cityscapes-images", type=int, default=None, help="fixture training images (16)")
    parser.add_argument("--cityscapes-repeats", type=int, default=None, help="timed STL steps per task (3)")
    parser.add_argument("--cityscapes-smto-repeats", type=int, default=None,
                        help=f"alternated pairs of {SMTO} and uniform MTL steps (3)")
    parser.add_argument("--top", type=int, default=8, help="ops listed per profiled step (Cityscapes)")
    parser.add_argument("--glue-tasks", default="sst2,cola", help="GLUE's MTL tasks; the first is the STL task")
    parser.add_argument("--glue-batch", type=int, default=None, help="GLUE's batch per task (32)")
    parser.add_argument("--max-length", type=int, default=None, help="GLUE's model option max_length (128)")
    parser.add_argument("--glue-train-size", type=int, default=None, help="GLUE training examples per task (256)")
    parser.add_argument("--glue-repeats", type=int, default=None, help="timed GLUE steps, each on a new batch (10)")
    parser.add_argument("--glue-factors", default="sharpness,fisher_trace,coherence",
                        help="GLUE's factors timed against an epoch (comma-separated; empty: none)")
    parser.add_argument("--factor-examples", type=int, default=None, help="examples per task the factors see (64)")
    parser.add_argument("--factor-chunk", type=int, default=8, help="per-example gradients per chunk (Fisher trace, "
                        "coherence; 8, as the GLUE runs of the project's profiles)")
    parser.add_argument("--factor-repeats", type=int, default=None, help="alternated factor / epoch pairs (2)")
    parser.add_argument("--data-root", default=None, help="the data root holding GLUE and the encoder "
                        "($MTLCORE_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    quick = {"width": 16, "repeats": 2, "smto_repeats": 1, "celeba_images": 120, "plain_width": 8, "plain_repeats": 4,
             "cityscapes_width": 8, "aspp_channels": 16, "cityscapes_images": 8, "cityscapes_repeats": 1,
             "cityscapes_smto_repeats": 1, "glue_train_size": 64, "glue_repeats": 2, "factor_examples": 32,
             "glue_batch": 8, "max_length": 64,
             "factor_repeats": 1}
    normal = {"width": 64, "repeats": 4, "smto_repeats": 2, "celeba_images": 500, "plain_width": 16,
              "plain_repeats": 10, "cityscapes_width": 64, "aspp_channels": 256, "cityscapes_images": 16,
              "cityscapes_repeats": 3, "cityscapes_smto_repeats": 3, "glue_train_size": 256, "glue_repeats": 10, "glue_batch": 32, "max_length": 128,
              "factor_examples": 64, "factor_repeats": 2}
    for key, value in (quick if args.quick else normal).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cityscapes_depth is None:
        args.cityscapes_depth = 50 if args.device.startswith("cuda") else 18
    chosen = args.settings.split(",")
    unknown = [s for s in chosen if s not in NAMES]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; valid: {list(NAMES)}")
    torch.set_num_threads(args.threads)
    logging.getLogger("mtlcore").setLevel(logging.ERROR)  # the fixtures are not the releases: MD5 warnings
    device = torch.device(args.device)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mtlcore-bench-settings-"))
    try:
        results = {s: bench_setting(s, work, args) for s in chosen if s in IMAGE_SETTINGS}
        jpeg = jpeg_check(work, args) if "celeba" in chosen and not args.no_jpeg else None
        cityscapes = bench_cityscapes(work, args) if "cityscapes" in chosen else None
        glue = bench_glue(args) if "glue" in chosen else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    OUT.mkdir(exist_ok=True)
    stem = "settings" if device.type == "cpu" else f"settings-{device.type}"
    for r in results.values():
        r.get("profile", {}).pop("ops", None)
        r.get("profile_smto", {}).pop("ops", None)
    report = {"args": vars(args), "smto": SMTO, "torch": torch.__version__, "wall_s": wall, "results": results,
              "jpeg": jpeg, "cityscapes": cityscapes, "glue": glue}
    (OUT / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))

    sections = []
    if results:  # CIFAR-100 and CelebA
        sizes = []
        for s, r in results.items():
            o = r["options"]
            extra = f", {o['image_size']}×{o['image_size']} images" if s == "celeba" else ", 32×32 images"
            sizes.append(f"{NAMES[s]}: STL 1 task, MTL {r['mtl_tasks']} tasks{extra}, fixture files of "
                         f"{o['train_size']}/{o['val_size']}/{o['test_size']} train/val/test examples"
                         f"{' per task' if s == 'cifar100' else ''}")
        header = (f"Measured {time.strftime('%Y-%m-%d')}, {_timing.machine(device)}, {os.cpu_count()} cores, "
                  f"torch.set_num_threads({args.threads}), torch {torch.__version__}, device {args.device}; ResNet18 width "
                  f"{args.width}, batch {args.batch} ({'per task' if 'cifar100' in results else ''}; CelebA: one batch for "
                  f"every attribute); {args.repeats} alternated repeats of {args.steps} step(s), {SMTO}: "
                  f"{args.smto_repeats}. {'; '.join(sizes)}. The data are the settings' fixture files, synthetic images "
                  f"in the released formats: for throughput and memory only their shapes matter. Run time {wall:.0f} s.")
        step_note = ("Each step is the trainer's (`Trainer.train_step`). STL: the median of the repeats, each drawing its "
                     "batch; MTL uniform: the median of the trainer's steps of the plain-loop comparison below (one fixed "
                     f"batch) plus the time of drawing a batch; {SMTO}: {args.smto_repeats} pair(s) alternated with the "
                     "uniform step after a warm-up step each (the median of the per-pair ratios). Samples/s counts every "
                     "task's examples (CIFAR-100) or the images (CelebA: each image carries all the attributes' targets).")
        memory_note = ("Peak memory, CPU: one step in a fresh process per configuration, its peak resident set reset "
                       "just before the step (`/proc/self/clear_refs`); the peak after the step (VmHWM) "
                       "minus the resident set before it (model, data, optimizer built, batch drawn). It includes the "
                       "gradients and momentum buffers the first step creates. ≥: the peak could not be reset and the "
                       "process had peaked higher before the step." if device.type == "cpu" else
                       "Peak memory, CUDA: `torch.cuda.max_memory_allocated` over one step after a warm-up, minus the "
                       "memory allocated before it.")
        sections += [f"# Settings: CIFAR-100 and CelebA\n\n{header}",
                    "## Training steps\n\n" + throughput_table(results, args) + "\n\n" + step_note + "\n\n" + memory_note
                    + "\n\n" + "\n".join(f"- {NAMES[s]}: drawing a batch takes {1e3 * r['draw_s']:.2f} ms." for s, r in
                                          results.items())]
        if any("memory" in r for r in results.values()):
            sections.append("## Peak memory of one step\n\n" + memory_table(results))
        sections.append("## The trainer's uniform MTL step against a plain PyTorch loop (same modules, same batch)\n\n"
                        + plain_table(results))
        if any("profile" in r or "profile_smto" in r for r in results.values()):
            sections.append("## What dominates a step (torch.profiler, self time)\n\n" + profile_table(results))
        if jpeg is not None:
            sections.append("## CelebA: JPEG decoding\n\n" + jpeg_table(jpeg))
    if cityscapes is not None:
        sections.append(cityscapes_section(cityscapes, args))
    if glue is not None:
        sections.append(glue_section(glue, args))
    text = "\n\n".join(sections) + "\n"
    print(text)
    (OUT / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
