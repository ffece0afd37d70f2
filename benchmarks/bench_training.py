"""Training throughput (samples/s) of the LeNet STL and MTL steps on FashionMTL, and the time of each
stage of a profile's book (`--profile quick`). A benchmark, not a test: run it on an idle machine.

    python benchmarks/bench_training.py                 # throughput only
    python benchmarks/bench_training.py --profile quick # + the stages of the quick book, from scratch
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
from mtlcore.config import RunConfig
from mtlcore.data import load_setting
from mtlcore.train import Trainer

ROOT = Path(__file__).resolve().parent.parent


def throughput(tasks: list[str], batch_size: int, steps: int, aggregator: str = "uniform", device: str = "cpu") -> float:
    """Training samples per second (all tasks' samples counted) of full optimisation steps."""
    config = RunConfig.from_dict({"tasks": tasks, "batch_size": batch_size, "device": device, "aggregator": aggregator,
                                  "setting_options": {"train_size": 4096, "val_size": 16, "test_size": 16}})
    setting = load_setting("fashion_mtl", tasks, config.setting_options)
    trainer = Trainer(config, setting, torch.device(device))

    def step():
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._update(trainer._forward(trainer.model, trainer._batches(), trainer.kinds))
        trainer.optimizer.step()

    for _ in range(5):
        step()
    return batch_size * len(tasks) / _timing.seconds(step, trainer.device, steps)


def profile_stages(profile: str) -> dict[str, float]:
    """Wall seconds of each stage of `make book PROFILE=profile`, from an empty results folder."""
    from mtlcore.batch import run_batch

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
    args = parser.parse_args()
    from mtlcore.models.fused import kernel_name

    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": args.device,
              "lenet_kernels": kernel_name() if args.device == "cpu" else "pytorch", "throughput": {}}
    for label, tasks in [("STL fashion1", ["fashion1"]), ("MTL fashion1+fashion2", ["fashion1", "fashion2"]),
                         ("MTL 3 tasks", ["fashion1", "fashion2", "noisy_fashion"])]:
        report["throughput"][f"{label}, batch 128"] = throughput(tasks, 128, args.steps, device=args.device)
    print(f"LeNet CPU kernels: {report['lenet_kernels']} (MTLCORE_FUSED_LENET=0 for PyTorch's)")
    for label, value in report["throughput"].items():
        print(f"{label:40s} {value:10.0f} samples/s")
    if args.profile:
        report["stages"] = profile_stages(args.profile)
        for label, value in report["stages"].items():
            print(f"{args.profile} book: {label:35s} {value:8.1f} s")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / ("training.json" if args.device == "cpu" else f"training-{torch.device(args.device).type}.json")).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
