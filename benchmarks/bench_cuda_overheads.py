"""Fixed costs of aggregation on a GPU, where small J are launch- and round-trip-bound (a CUDA machine only).

1. d = Jᵀw and ways of checking it for NaN/inf: the floor (the product alone, which is TorchJD's uniform and
   fixed weighting) against a sum read on the host (mtlcore's check), the sum copied to pinned memory with an
   event, `isfinite(d).all()` and `d · d`.
2. The randomised methods whose draws are used on the host (PCGrad, GradVac: task orders; RLW: weights) with the
   CPU generator the trainer gives them, against a generator on the GPU, and TorchJD's PCGrad, GradVac and Random.

Medians of `--calls` synchronised calls, the median again over `--rounds` rounds that alternate the variants.

    python benchmarks/bench_cuda_overheads.py [--rounds 3 --calls 15]

Prints markdown tables and writes them to benchmarks/out/cuda_overheads.md. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

import _timing
from mtlcore import aggregators

try:
    import torchjd.aggregation as tjd
except ImportError:  # the TorchJD columns read n/a
    tjd = None

OUT = Path(__file__).resolve().parent / "out"
SHAPES = [(3, 431_080), (20, 11_176_512)]  # (a) LeNet's and (b) ResNet18 × 20's shared parameters
DEVICE = torch.device("cuda")


def median_ms(variants: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median wall time of one call of each variant (device work included), alternating the variants."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            fn()  # warm-up: allocations, lazy initialisation
            times[name].append(statistics.median(_timing.seconds(fn, DEVICE) for _ in range(calls)) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def check_variants(J: torch.Tensor) -> dict:
    w = torch.full((J.shape[0],), 1 / J.shape[0], device=DEVICE)
    pinned, event = torch.empty((), pin_memory=True), torch.cuda.Event()

    def pinned_sum():
        pinned.copy_(torch.mv(J.T, w).sum(), non_blocking=True)
        event.record()
        event.synchronize()
        return math.isfinite(pinned)

    return {
        "nothing (the floor; TorchJD's `w @ J`)": lambda: w @ J,
        "`torch.mv(J.T, w)` alone": lambda: torch.mv(J.T, w),
        "a sum, read on the host (mtlcore)": lambda: math.isfinite(torch.mv(J.T, w).sum()),
        "the sum copied into pinned memory, an event waited on": pinned_sum,
        "`isfinite(d).all()`, read": lambda: bool(torch.isfinite(torch.mv(J.T, w)).all()),
        "`d · d`, read": lambda: math.isfinite(torch.dot(*[torch.mv(J.T, w)] * 2)),
    }


def randomised_variants(J: torch.Tensor) -> dict:
    K = J.shape[0]
    losses = torch.rand(K, device=DEVICE) + 0.5
    theirs = {"pcgrad": "PCGrad", "gradvac": "GradVac", "rlw": "Random"}
    variants = {}
    for name in ("pcgrad", "gradvac", "rlw"):
        for where in ("cpu", "cuda"):
            agg = aggregators.get(name)
            agg.reset(K, DEVICE)
            agg.set_generator(torch.Generator(where).manual_seed(0))
            label = f"{name}, {where} generator" + (" (the trainer's)" if torch.device(where) ==
                                                    agg.generator_device(DEVICE) else "")
            variants[label] = (lambda a=agg: a.combine(losses)) if agg.kind == "loss" else (lambda a=agg: a(J))
        if tjd is not None:
            variants[f"TorchJD {theirs[name]}(J)"] = lambda a=getattr(tjd, theirs[name])(): a(J)
    return variants


def table(title: str, results: list[dict[str, float]]) -> str:
    head = " | ".join(f"{K} × {P:,}" for K, P in SHAPES)
    rows = [f"| {name} | " + " | ".join(f"{r[name]:.3f}" for r in results) + " |" for name in results[0]]
    return "\n".join([f"### {title} (ms)", "", f"| | {head} |", "|---|" + "---:|" * len(SHAPES), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_overheads.py needs a CUDA device")
    checks, draws = [], []
    for shape in SHAPES:
        J = torch.randn(*shape, device=DEVICE)
        checks.append(median_ms(check_variants(J), args.rounds, args.calls))
        draws.append(median_ms(randomised_variants(J), args.rounds, args.calls))
        del J
        torch.cuda.empty_cache()
    report = "\n\n".join([
        f"Measured on {_timing.machine(DEVICE)}, torch {torch.__version__}.",
        table("d = Jᵀw, then", checks),
        table("Randomised methods, by where their generator lives (RLW: `combine(losses)`)", draws),
    ])
    OUT.mkdir(exist_ok=True)
    (OUT / "cuda_overheads.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
