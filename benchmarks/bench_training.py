"""Training throughput (samples/s) of the LeNet STL and MTL steps on FashionMTL, for each of its models (`lenet_fused`,
the opt-in fused CPU kernels, and `lenet`, PyTorch's ops), and the time of each stage of a profile's book
(`--profile quick`). A benchmark, not a test: run it on an idle machine.

    python benchmarks/bench_training.py                 # throughput only
    python benchmarks/bench_training.py --profile quick # + the stages of the quick book, from scratch
    python benchmarks/bench_training.py --models lenet --steps 5   # one model, a short check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _timing
from mtlcore.settings.fashion_mtl.fused import kernel_name

ROOT = Path(__file__).resolve().parent.parent


def throughput(tasks: list[str], batch_size: int, steps: int, aggregator: str = "uniform", device: str = "cpu",
               model: str = "lenet_fused", data_root: str | None = None) -> float:
    """Training samples per second (all tasks' samples counted) of full optimisation steps (the trainer's step)."""
    trainer = _timing.trainer({"setting": "fashion_mtl", "tasks": tasks, "model": model, "batch_size": batch_size,
                               "device": device, "aggregator": aggregator,
                               "setting_options": {"train_size": 4096, "val_size": 16, "test_size": 16}}, data_root)
    trainer.model.train()  # as in a training epoch: dropout on

    def step():
        _timing.training_step(trainer)

    for _ in range(5):
        step()
    return batch_size * len(tasks) / _timing.seconds(step, trainer.device, steps)


def profile_stages(profile: str) -> dict[str, float]:
    """Wall seconds of each stage of `make book PROFILE=profile`, from an empty results folder."""
    from mtlcore.book import run_batch

    results = Path(tempfile.mkdtemp(prefix="mtlcore-bench-"))
    book = ROOT / "book"
    stages = {}
    start = time.perf_counter()
    run_batch(profile, results_root=results, book_dir=book, progress=False)
    stages["notebooks (training + analysis)"] = time.perf_counter() - start
    runs = list((results / profile / "runs").glob("*.nc"))
    import xarray as xr

    stages["of which training runs"] = sum(float(xr.open_dataset(p, engine="h5netcdf").attrs["wall_seconds"]) for p in runs)
    shutil.rmtree(book / "_build", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(book), "--warningiserror", "--keep-going"],
                   check=True, capture_output=True)
    stages["jupyter-book build"] = time.perf_counter() - start
    stages["total"] = stages["notebooks (training + analysis)"] + stages["jupyter-book build"]
    shutil.rmtree(results, ignore_errors=True)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile", default=None, help="also time the stages of this profile's book")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the throughput only)")
    parser.add_argument("--models", default=None,
                        help="FashionMTL models to time, comma-separated (lenet_fused: the fused CPU kernels; lenet: "
                             "PyTorch's ops); default both on the CPU, lenet on CUDA (where lenet_fused is lenet)")
    parser.add_argument("--data-root", default=None, help="FashionMTL's data root (default: $MTLCORE_DATA_DIR)")
    args = parser.parse_args()

    models = args.models.split(",") if args.models else (["lenet_fused", "lenet"] if args.device == "cpu" else ["lenet"])
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": args.device,
              "models": models, "throughput": {}}
    if "lenet_fused" in models:  # what computes its conv blocks: the fused kernels on the CPU where they build
        report["lenet_fused_kernels"] = kernel_name() if args.device == "cpu" else "pytorch"
        print(f"lenet_fused's conv blocks: {report['lenet_fused_kernels']}")
    for model in models:
        for label, tasks in [("STL fashion1", ["fashion1"]), ("MTL fashion1+fashion2", ["fashion1", "fashion2"]),
                             ("MTL 3 tasks", ["fashion1", "fashion2", "noisy_fashion"])]:
            report["throughput"][f"{model}: {label}, batch 128"] = throughput(
                tasks, 128, args.steps, device=args.device, model=model, data_root=args.data_root)
    for label, value in report["throughput"].items():
        print(f"{label:50s} {value:10.0f} samples/s")
    if args.profile:
        report["stages"] = profile_stages(args.profile)
        for label, value in report["stages"].items():
            print(f"{args.profile} book: {label:35s} {value:8.1f} s")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / ("training.json" if args.device == "cpu" else f"training-{torch.device(args.device).type}.json")).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
