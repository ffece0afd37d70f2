"""Cost of every multi-task aggregator: one training step and the aggregation alone, against the uniform step
and against TorchJD.

For each method in `mtlcore.aggregators.available()` (`fixed` with weights [1/K]*K, every other method with
its defaults) it reports, relative to the uniform step (the trainer's fast path, one backward of Σ L_k):

* the wall time of ONE training step, exactly the trainer's step (`_timing.training_step`, the body of
  `Trainer._train_epoch`: one forward of all tasks' batches, the run's update rule (`mtlcore.training.updates`:
  task Jacobian or loss combination, aggregation, backward), `optimizer.step()`, FAMO's hook);
  the method and the uniform step are timed alternately in the same process (median over repeats of
  the paired ratio), with `torch.set_num_threads(1)`;
* the peak memory of that step: the peak of the bytes of live tensors allocated during the step, from
  `torch.profiler.profile(profile_memory=True)` (the "Total Allocated" counter of the profiler's memory
  events, minus its value before the step); memory held before the step (parameters, momentum) is not
  counted, allocations outside torch (scipy, cvxpy) are not seen;
* the aggregation alone, `agg(J, losses)` on one fixed J, against TorchJD's aggregator on the same J
  (n/a when `torchjd` is not importable), and the tensor memory each allocates on top of J.

Settings: (a) FashionMTL's `lenet_fused` (`--model lenet` for PyTorch's ops), 3 tasks, batch 128, real data through
`Trainer`; (b) ResNet18 (fc → Identity, 512 features) with 20 linear heads of 5 classes, CIFAR-100-shaped random
inputs (64 per task), 32 per task and step: a benchmark setting registered in this process (`RandomImages`), so that
its `Trainer` is built as any run's and the step is the trainer's own. In (b) a Jacobian step
takes minutes at one thread, so it is run once (under the memory profiler, whose overhead is small next
to minutes; its wall time is the step's time) with uniform weights; the step
of each other gradient-level method is estimated as that step minus its aggregation time plus the
method's own (marked ≈), its memory is that step's peak (≈) plus the aggregation's own column.

    .venv/bin/python benchmarks/bench_aggregators.py                      # both settings ((a) ≈ 4 min, (b) ≈ 30–40 min)
    .venv/bin/python benchmarks/bench_aggregators.py --settings a --repeats 7 --steps 20
    .venv/bin/python benchmarks/bench_aggregators.py --settings aJ --only krum,config    # some methods only

MoDo and SDMGrad take three batches a step: their training step is timed as is (three Jacobians), never estimated,
and their aggregation alone is `aggregate_batches([J, J, J])`.

Writes benchmarks/out/aggregators.md (and prints it). A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

import _timing
from mtlcore import aggregators, settings
from mtlcore.aggregators import task_jacobian
from mtlcore.settings.base import Examples, MultiTaskModel, Setting, SettingData, Task
from mtlcore.settings.fashion_mtl import ACCURACY, CrossEntropy
from mtlcore.training import Trainer
from mtlcore.training.updates import UniformUpdate

try:
    import torchjd.aggregation as tjd
except ImportError:  # the script still runs; TorchJD columns read n/a
    tjd = None

OUT = Path(__file__).resolve().parent / "out"
RESNET18_SHARED = 11_176_512  # parameters of torchvision's ResNet18 without its fc layer
MB = 2**20
DEVICE = torch.device("cpu")  # --device
# mtlcore name → TorchJD aggregator for K tasks (rlw is loss-level in mtlcore: combine(losses) vs Random(J)).
TORCHJD = {
    "uniform": lambda K: tjd.Mean(), "fixed": lambda K: tjd.Constant(torch.full((K,), 1 / K, device=DEVICE)),
    "mgda": lambda K: tjd.MGDA(), "pcgrad": lambda K: tjd.PCGrad(), "cagrad": lambda K: tjd.CAGrad(c=0.5),
    "nashmtl": lambda K: tjd.NashMTL(n_tasks=K), "imtl_g": lambda K: tjd.IMTLG(), "graddrop": lambda K: tjd.GradDrop(),
    "gradvac": lambda K: tjd.GradVac(), "aligned_mtl": lambda K: tjd.AlignedMTL(), "upgrad": lambda K: tjd.UPGrad(),
    "dualproj": lambda K: tjd.DualProj(), "rlw": lambda K: tjd.Random(),
    "krum": lambda K: tjd.Krum(n_byzantine=0), "trimmed_mean": lambda K: tjd.TrimmedMean(trim_number=1),
    "config": lambda K: tjd.ConFIG(), "fairgrad": lambda K: tjd.FairGrad(alpha=1.0),
    "excess_mtl": lambda K: tjd.ExcessMTL(robust_step_size=1e-2),
    "cr_mogm": lambda K: tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(tjd.MGDAWeighting(), alpha=0.9)),
    # TorchJD's MoDo and SDMGrad are weightings of J_ξJ_ξ'ᵀ: their aggregation here is that product, the weighting
    # and J_ζᵀw, on the same J thrice (as mtlcore's `aggregate_batches([J, J, J])` below)
    "modo": lambda K: _cross_weighted(tjd.MoDoWeighting(gamma=1e-3, rho=0.1)),
    "sdmgrad": lambda K: _cross_weighted(tjd.SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)),
}
ONLY: set[str] | None = None  # --only: the methods to time (None: all)


def _cross_weighted(weighting):
    return lambda J: J.T @ weighting(J @ J.T)


def methods(K: int) -> list[tuple[str, str, dict]]:
    """(label, aggregator, options); "uniform" is the trainer's fast path, "uniform (via J)" its Jacobian path."""
    rows = [("uniform", "uniform", {}), ("uniform (via J)", "uniform", {"reduction": "mean"})]
    rows += [(n, n, {"weights": [1 / K] * K} if n == "fixed" else {}) for n in aggregators.available() if n != "uniform"]
    return [row for row in rows if row[0] == "uniform" or ONLY is None or row[0] in ONLY]


def make_aggregator(name: str, options: dict, K: int):
    agg = aggregators.get(name, **options)
    agg.reset(K, DEVICE)
    if agg.randomised:
        agg.set_generator(torch.Generator(agg.generator_device(DEVICE)).manual_seed(0))  # on the trainer's device
    return agg


# -- measuring -----------------------------------------------------------------------------------------
def seconds(fn, n: int = 1) -> float:
    return _timing.seconds(fn, DEVICE, n)


def peak_bytes(fn) -> float:
    """Peak bytes of tensors allocated by fn() and alive at once, from the profiler's memory events
    (on CUDA, from the caching allocator's peak statistics)."""
    if DEVICE.type == "cuda":
        _timing.sync(DEVICE)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _timing.sync(DEVICE)
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    memory = sorted((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    if not memory:
        return 0.0
    before = memory[0][1] - memory[0][2]  # the counter just before the first allocation
    return max(total for _, total, _ in memory) - before


def kind(trainer: Trainer) -> str:
    return "fast path" if isinstance(trainer.update, UniformUpdate) else trainer.update.aggregator.kind


def step(trainer: Trainer) -> None:
    """One iteration of Trainer._train_epoch (without its bookkeeping)."""
    _timing.training_step(trainer)


def paired(method_fn, baseline_fn, repeats: int, n: int) -> tuple[float, float, float]:
    """Median method time, median baseline time and median of the per-repeat ratios (timed alternately)."""
    pairs = [(seconds(method_fn, n), seconds(baseline_fn, n)) for _ in range(repeats)]
    return (statistics.median(m for m, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(m / b for m, b in pairs))


def aggregation_rows(J: torch.Tensor, losses: torch.Tensor, repeats: int, n: int) -> list[dict]:
    """agg(J, losses) of every gradient-level method (and rlw's combine) against TorchJD on the same J."""
    K, rows = len(J), []
    for label, name, options in methods(K)[1:]:
        agg = make_aggregator(name, options, K)
        if agg.kind == "loss" and name != "rlw" or getattr(agg, "jacobian_of", "shared") != "shared":
            continue
        if getattr(agg, "batches_per_step", 1) > 1:  # modo, sdmgrad: the same J as all three batches
            ours = lambda: agg.aggregate_batches([J, J, J], [losses] * 3)
        else:
            ours = (lambda: agg.combine(losses)) if agg.kind == "loss" else (lambda: agg(J, losses))
        ours()  # warm-up
        row = {"method": label, "ms": None, "tjd_ms": None, "ratio": None, "mb": peak_bytes(ours) / MB, "tjd_mb": None}
        theirs = None
        if tjd is not None and name in TORCHJD:
            try:
                theirs = TORCHJD[name](K)
                theirs(J)
            except ImportError as error:  # a TorchJD extra (cvxpy, quadprog) is missing
                print(f"TorchJD {name}: n/a ({error})", flush=True)
                theirs = None
        if theirs is not None:
            ms, tjd_ms, ratio = paired(ours, lambda: theirs(J), repeats, n)
            row.update(ms=1e3 * ms, tjd_ms=1e3 * tjd_ms, ratio=ratio)
            row["tjd_mb"] = peak_bytes(lambda: theirs(J)) / MB
        else:
            row["ms"] = 1e3 * statistics.median(seconds(ours, n) for _ in range(repeats))
        rows.append(row)
    return rows


# -- the two settings ------------------------------------------------------------------------------------
def fashion(args) -> tuple[list[dict], list[dict]]:
    tasks = ["fashion1", "fashion2", "noisy_fashion"]
    sizes = {"train_size": 2048, "val_size": 16, "test_size": 16}
    data = settings.get("fashion_mtl").load(tasks, sizes, root=args.data_root)

    def trainer(name, options):
        t = _timing.trainer({"setting": "fashion_mtl", "tasks": tasks, "model": args.model, "batch_size": 128,
                             "device": str(DEVICE), "aggregator": name, "aggregator_options": options,
                             "setting_options": sizes}, data=data)
        for _ in range(args.warmup):
            step(t)
        return t

    base = trainer("uniform", {})
    base_peak = peak_bytes(lambda: step(base))
    rows = []
    for label, name, options in methods(len(tasks)):
        t = trainer(name, options)
        ms, base_ms, ratio = paired(lambda: step(t), lambda: step(base), args.repeats, args.steps)
        peak = peak_bytes(lambda: step(t))
        rows.append({"method": label, "kind": kind(t),
                     "ms": 1e3 * ms, "ratio": ratio, "mb": peak / MB, "mem_ratio": peak / base_peak})
        print(f"(a) {label:18s} {1e3 * ms:8.1f} ms  ×{ratio:.2f}   {peak / MB:7.1f} MB ×{peak / base_peak:.2f}", flush=True)
    losses = base._losses(base._batch())  # one step's task losses, as the trainer computes them
    J = task_jacobian(losses.parts, base.model.shared_parameters(), method="loop")  # as JacobianUpdate forms it
    return rows, aggregation_rows(J.detach(), losses.losses.detach(), args.repeats, args.agg_calls)


class Capture:
    """Wraps an aggregator: records J, the losses and the time of each agg(J, losses) inside a step."""

    def __init__(self, agg):
        self.agg, self.J, self.seconds = agg, None, 0.0

    def __getattr__(self, name):
        return getattr(self.agg, name)

    def __call__(self, J, losses=None):
        self.seconds = seconds(lambda: setattr(self, "d", self.agg(J, losses)))
        self.J, self.losses = J.detach(), losses
        return self.d


def resnet18_heads(tasks: list[str]) -> MultiTaskModel:
    """ResNet18 (fc → Identity, 512 features) with a linear head of 5 classes per task."""
    import torchvision

    encoder = torchvision.models.resnet18(num_classes=10)
    encoder.fc = nn.Identity()
    model = MultiTaskModel(encoder, {task: nn.Linear(512, 5) for task in tasks})
    model.memory_format = torch.channels_last  # the trainer puts the model in this layout
    return model


class RandomImages(Setting):
    """(b)'s setting: tasks t0, t1, ... of 5 classes on CIFAR-100-shaped random inputs (`train_size` per task), the
    model ResNet18 with a linear head per task. Registered in this process only."""

    name, display_name = "bench_random_images", "Random images (benchmark)"
    tasks = tuple(f"t{k}" for k in range(100))
    defaults = {"train_size": 64}
    models, default_model = {"resnet18": resnet18_heads}, "resnet18"

    def load(self, tasks, options, root=None, download=True):
        n = self.resolve_options(options)["train_size"]
        g = torch.Generator().manual_seed(0)
        train = {t: Examples(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))
                 for t in self.check_tasks(tasks)}
        unused = {t: e.first(1) for t, e in train.items()}  # val and test: never evaluated here
        return SettingData(list(tasks), {"train": train, "val": unused, "test": unused}, info={"train_size": n})

    def task(self, name):
        return Task(name, CrossEntropy(), (ACCURACY,))


def resnet(args) -> tuple[list[dict], list[dict]]:
    K = args.resnet_tasks
    settings.register(RandomImages)
    tasks = [f"t{k}" for k in range(K)]
    data = settings.get(RandomImages.name).load(tasks, {})

    def trainer(name, options):  # batch 32 per task, momentum SGD 1e-2, summed losses, own heads: the defaults
        return _timing.trainer({"setting": RandomImages.name, "tasks": tasks, "batch_size": 32, "device": str(DEVICE),
                                "aggregator": name, "aggregator_options": options}, data=data)

    def run(t):
        return step(t)

    base = trainer("uniform", {})
    run(base)  # warm-up (one step: each one takes seconds)
    base_peak = peak_bytes(lambda: run(base))
    rows = []
    # The Jacobian step, once, under the memory profiler (its profiling overhead is small next to minutes).
    jstep = trainer("uniform", {"reduction": "mean"})
    jstep.update.aggregator = capture = Capture(jstep.update.aggregator)
    start = time.perf_counter()
    j_peak = peak_bytes(lambda: run(jstep))
    j_seconds, j_agg = time.perf_counter() - start, capture.seconds
    u_seconds = statistics.median(seconds(lambda: run(base)) for _ in range(args.resnet_repeats))
    print(f"(b) Jacobian step {j_seconds:.1f} s (agg {j_agg:.2f} s), uniform {u_seconds:.1f} s", flush=True)
    agg_rows = aggregation_rows(capture.J, capture.losses, args.resnet_repeats, 1)
    agg_ms = {r["method"]: r["ms"] for r in agg_rows}
    for label, name, options in methods(K):
        t = base if label == "uniform" else trainer(name, options)
        if (DEVICE.type == "cpu" and not isinstance(t.update, UniformUpdate) and t.update.aggregator.kind == "gradient"
                and t.update.aggregator.jacobian_of == "shared"
                and getattr(t.update.aggregator, "batches_per_step", 1) == 1):  # modo, sdmgrad: three J a step
            ms = 1e3 * (j_seconds - j_agg) + agg_ms[label]  # estimated from the measured Jacobian step
            rows.append({"method": label, "kind": "gradient", "ms": ms, "ratio": ms / (1e3 * u_seconds),
                         "mb": j_peak / MB, "mem_ratio": j_peak / base_peak, "estimated": True})
        else:
            ms, _, ratio = paired(lambda: run(t), lambda: run(base), args.resnet_repeats, 1)
            peak = peak_bytes(lambda: run(t))
            rows.append({"method": label, "kind": kind(t),
                         "ms": 1e3 * ms, "ratio": ratio, "mb": peak / MB, "mem_ratio": peak / base_peak})
        print(f"(b) {label:18s} {rows[-1]['ms']:9.0f} ms  ×{rows[-1]['ratio']:.2f}", flush=True)
    return rows, agg_rows


# -- report ------------------------------------------------------------------------------------------------
def fmt(value, spec=".2f", prefix=""):
    return "n/a" if value is None else f"{prefix}{value:{spec}}"


def step_table(rows: list[dict]) -> str:
    lines = ["| method | kind | step (ms) | step / uniform | peak tensor memory (MB) | peak / uniform |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        est = "≈" if r.get("estimated") else ""
        lines.append(f"| {r['method']} | {r['kind']} | {est}{r['ms']:.1f} | {est}{r['ratio']:.2f} | "
                     f"{est}{r['mb']:.1f} | {est}{r['mem_ratio']:.2f} |")
    return "\n".join(lines)


def agg_table(rows: list[dict]) -> str:
    lines = ["| method | mtlcore agg (ms) | TorchJD (ms) | mtlcore / TorchJD | mtlcore extra memory (MB) | TorchJD extra memory (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        note = " †" if r["method"] == "rlw" else ""
        lines.append(f"| {r['method']}{note} | {r['ms']:.3f} | {fmt(r['tjd_ms'], '.3f')} | {fmt(r['ratio'])} | "
                     f"{r['mb']:.2f} | {fmt(r['tjd_mb'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="ab", help="a: FashionMTL LeNet, b: ResNet18 × 20 tasks, J: only (b)'s "
                        "aggregation, on a random J of its shape (minutes instead of ~40) (default: ab)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method in (a) and for the aggregation")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat in (a)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method in (a)")
    parser.add_argument("--agg-calls", type=int, default=20, help="agg(J) calls per timed repeat in (a)")
    parser.add_argument("--resnet-repeats", type=int, default=2, help="timed repeats (of one step) per method in (b)")
    parser.add_argument("--resnet-tasks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default="/work/shared/data")
    parser.add_argument("--model", default="lenet_fused", help="(a)'s FashionMTL model: lenet_fused (the fused CPU "
                        "kernels) or lenet (PyTorch's ops)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; on cuda every (b) step is timed, none estimated")
    parser.add_argument("--only", default="", help="comma-separated methods to time (default: all); the uniform step "
                        "is always timed as the baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, ONLY
    DEVICE = torch.device(args.device)
    ONLY = {name for name in args.only.split(",") if name} or None
    unknown = sorted((ONLY or set()) - set(aggregators.available()) - {"uniform (via J)"})
    if unknown:
        parser.error(f"--only: unknown method(s) {unknown}; valid: {', '.join(aggregators.available())}")

    header = (f"{time.strftime('%Y-%m-%d')}, {_timing.machine(DEVICE)}, {os.cpu_count()} cores, "
              f"torch.set_num_threads({args.threads}), torch {torch.__version__}, "
              f"TorchJD {'n/a' if tjd is None else version('torchjd')}")
    sections = [f"Measured {header}."]
    titles = {"a": f"(a) FashionMTL {args.model}, 3 tasks, batch 128 per task",
              "b": f"(b) ResNet18 + {args.resnet_tasks} linear heads, 3×32×32 random inputs, batch 32 per task"}
    for key in args.settings:
        if key == "J":
            g = torch.Generator().manual_seed(0)
            J = torch.randn(args.resnet_tasks, RESNET18_SHARED, generator=g).to(DEVICE)
            sections += [f"### (b)'s aggregation alone on a random J ({args.resnet_tasks} × {RESNET18_SHARED:,}, "
                         "ResNet18's shared-parameter count)",
                         agg_table(aggregation_rows(J, (torch.rand(args.resnet_tasks, generator=g) + 0.5).to(DEVICE), args.resnet_repeats, 1))]
            continue
        steps, aggs = fashion(args) if key == "a" else resnet(args)
        sections += [f"### {titles[key]}: one training step", step_table(steps),
                     f"### {titles[key]}: aggregation alone on one fixed J ({'3' if key == 'a' else args.resnet_tasks} tasks)",
                     agg_table(aggs)]
    sections.append("† rlw is loss-level in mtlcore: its time is `combine(losses)` (it never forms J), TorchJD's is "
                    "`Random()(J)`.")
    text = "\n\n".join(sections) + "\n"
    OUT.mkdir(exist_ok=True)
    suffix = "" if DEVICE.type == "cpu" else f"-{DEVICE.type}"
    suffix += "" if ONLY is None else "-only"
    (OUT / f"aggregators{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
