"""Cost of the trajectory factors at one checkpoint, relative to one training epoch, on FashionMTL.

Quick-profile sizes: tasks fashion1 + fashion2, 5,000 training examples per task, batch 128, so one epoch is
ceil(5000/128) = 40 steps of the trainer's step (`_timing.training_step`: the uniform fast path) with the profiles'
model `lenet_fused` (`--model lenet` for PyTorch's ops; the factors' vmap'd gradients take PyTorch's ops either
way). At one checkpoint, with the arguments `mtlcore.metrics.schedule.FactorSchedule.measure` uses (the first 2,048
training examples of each task, each task's `Loss`), it times, per task and summed over the two tasks:

* `sharpness` (m = 128, ρ = 1e-3, 20 ascent steps), `fisher_trace` (2,048 examples, sampled labels),
* `gradient_coherence` per task (B = 16, L = 1024) and `multitask_gradient_coherence`,
* `gradient_conflict` with 200 batches of 128 (the default) and with 20,

and, separately, `per_example_squared_norms(..., method="vmap")` against `method="loop"` on LeNet.
Each repeat times the epoch and every factor one after the other in this process (medians over repeats,
ratios per repeat), with `torch.set_num_threads(1)` unless --threads says otherwise.

    .venv/bin/python benchmarks/bench_metrics.py                 # ≈ 5 min
    .venv/bin/python benchmarks/bench_metrics.py --repeats 3 --per-example 128

Writes benchmarks/out/metrics.md (and prints it). A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

import _timing
from mtlcore.metrics import (
    fisher_trace,
    gradient_coherence,
    gradient_conflict,
    multitask_gradient_coherence,
    per_example_squared_norms,
    sharpness,
)
from mtlcore.training import RunConfig

OUT = Path(__file__).resolve().parent / "out"
TASKS = ["fashion1", "fashion2"]


DEVICE = torch.device("cpu")  # --device


def seconds(fn) -> float:
    return _timing.seconds(fn, DEVICE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the epoch and of every factor")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--examples", type=int, default=2048, help="examples per task the factors see")
    parser.add_argument("--per-example", type=int, default=256, help="examples for the vmap-vs-loop comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--profile", default="quick", help="also time one checkpoint exactly as this profile's runs measure it")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="lenet_fused", help="the FashionMTL model trained in the epoch (lenet_fused, lenet)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)

    sizes = {"train_size": args.train_size, "val_size": 16, "test_size": 16}
    trainer = _timing.trainer({"setting": "fashion_mtl", "tasks": TASKS, "model": args.model, "batch_size": 128,
                               "device": args.device, "setting_options": sizes}, args.data_root)
    model, batch = trainer.model, trainer.config.batch_size

    def epoch():  # Trainer._train_epoch's steps (without its bookkeeping)
        model.train()
        for _ in range(trainer.steps_per_epoch):
            _timing.training_step(trainer)

    # the first examples of each task and its loss, as FactorSchedule.measure takes them
    examples = {t: trainer.data.examples["train"][t].first(args.examples) for t in TASKS}
    data = {t: (e.inputs, e.targets) for t, e in examples.items()}
    losses = {t: trainer.setting.task(t).loss for t in TASKS}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    coherence = {"small_batch": 16, "large_batch": min(1024, args.examples)}
    factors = {
        "sharpness (m=128, ρ=1e-3)": lambda: [sharpness(model, t, *data[t], loss=losses[t], rho=1e-3, batch_size=batch,
                                                        generator=gen()) for t in TASKS],
        f"fisher_trace ({args.examples} examples)": lambda: [fisher_trace(model, t, *data[t], loss=losses[t],
                                                                          generator=gen()) for t in TASKS],
        f"gradient_coherence per task (B=16, L={coherence['large_batch']})": lambda: [gradient_coherence(model, t, *data[t], loss=losses[t],
                                                                                  generator=gen(), **coherence)
                                                               for t in TASKS],
        "multitask_gradient_coherence": lambda: multitask_gradient_coherence(model, data, TASKS, losses=losses,
                                                                             generator=gen(), **coherence),
        "gradient_conflict (200 batches of 128)": lambda: gradient_conflict(model, data, losses=losses, batch_size=batch,
                                                                            num_batches=200, generator=gen()),
    }
    conflict_20 = "gradient_conflict (20 batches of 128)"
    factors[conflict_20] = lambda: gradient_conflict(model, data, losses=losses, batch_size=batch, num_batches=20,
                                                     generator=gen())
    x, y = examples[TASKS[0]].first(args.per_example).inputs, examples[TASKS[0]].first(args.per_example).targets
    per_example = {m: (lambda m=m: per_example_squared_norms(model, TASKS[0], x, y, loss=losses[TASKS[0]], method=m))
                   for m in ("vmap", "loop")}

    epoch()  # warm-up: momentum buffers, oneDNN primitives (each factor runs hundreds of passes: no warm-up)
    for fn in per_example.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ["epoch", *factors, *per_example]}
    for r in range(args.repeats):
        times["epoch"].append(seconds(epoch))
        for name, fn in [*factors.items(), *per_example.items()]:
            times[name].append(seconds(fn))
        print(f"repeat {r + 1}/{args.repeats}: epoch {times['epoch'][-1]:.2f} s", flush=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = {name: statistics.median(t / e for t, e in zip(values, times["epoch"])) for name, values in times.items()}
    checkpoint = [name for name in factors if name != conflict_20]
    totals = {"all factors, 200 conflict batches": checkpoint,
              "all factors, 20 conflict batches": [n for n in checkpoint if not n.startswith("gradient_conflict")] + [conflict_20]}
    steps = math.ceil(args.train_size / batch)
    lines = [f"Measured {time.strftime('%Y-%m-%d')}, {_timing.machine(DEVICE)}, {os.cpu_count()} cores, "
             f"torch.set_num_threads({args.threads}), torch {torch.__version__}; median of {args.repeats} repeats (the epoch "
             f"and the per-example gradients after one warm-up). Factors are summed over the 2 tasks (fashion1, fashion2), on their first {args.examples} "
             f"training examples; one epoch = {steps} steps of 2 × 128 examples.", "",
             "| at one checkpoint | seconds | / one training epoch |", "|---|---:|---:|",
             f"| one training epoch ({steps} steps) | {median['epoch']:.2f} | 1.00 |"]
    lines += [f"| {name} | {median[name]:.2f} | {ratio[name]:.2f} |" for name in factors]
    for label, names in totals.items():
        per_repeat = [sum(times[n][r] for n in names) for r in range(args.repeats)]
        lines.append(f"| **{label}** | **{statistics.median(per_repeat):.2f}** | "
                     f"**{statistics.median(t / e for t, e in zip(per_repeat, times['epoch'])):.2f}** |")
    speedups = [loop / vmap for vmap, loop in zip(times["vmap"], times["loop"])]
    lines += ["", f"| per_example_squared_norms, LeNet, {args.per_example} examples of {TASKS[0]} | seconds |",
              "|---|---:|", f"| method='vmap' | {median['vmap']:.3f} |", f"| method='loop' | {median['loop']:.3f} |",
              f"| **speed-up of vmap over the loop** | **{statistics.median(speedups):.1f}×** |"]
    if args.profile:
        lines += ["", *profile_checkpoint(args.profile, args.repeats, args.data_root, args.device)]
    text = "\n".join(lines) + "\n"
    OUT.mkdir(exist_ok=True)
    (OUT / ("metrics.md" if DEVICE.type == "cpu" else f"metrics-{DEVICE.type}.md")).write_text(text)
    print(text)


def profile_checkpoint(profile: str, repeats: int, data_root: str, device: str = "cpu") -> list[str]:
    """One checkpoint of a profile's MTL run (FactorSchedule.measure with the profile's metrics settings)
    against one epoch of that run, both exactly as the trainer does them."""
    from tqdm import tqdm

    from mtlcore.book import profile_parameters
    from mtlcore.training import base_config

    p = profile_parameters(profile)["sec4_1_factors"]
    tasks = [p["target"], p["partners"][0]]
    config = RunConfig.from_dict(base_config(p) | {"tasks": tasks, "device": device})
    trainer = _timing.trainer(config, data_root)
    tasks_of_run = {t: trainer.setting.task(t) for t in trainer.tasks}
    bar = tqdm(disable=True)
    epoch = lambda: trainer._train_epoch(bar)  # noqa: E731
    checkpoint = lambda: trainer.factors.measure(trainer.model, trainer.data, tasks_of_run, 0,  # noqa: E731
                                                 trainer.update.direction())
    epoch()
    pairs = [(seconds(epoch), seconds(checkpoint)) for _ in range(repeats)]
    e, c = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
    r = statistics.median(y / x for x, y in pairs)
    return [f"Profile `{profile}` ({'+'.join(tasks)}, model {config.resolved()['model']}, "
            f"{config.setting_options['train_size']} examples per task, batch {config.batch_size}, metrics {config.metrics}):", "",
            "| | seconds | / one epoch |", "|---|---:|---:|",
            f"| one training epoch ({trainer.steps_per_epoch} steps) | {e:.2f} | 1.00 |",
            f"| one checkpoint, all factors, as the profile measures it | {c:.2f} | {r:.2f} |"]


if __name__ == "__main__":
    main()
