"""A grid of the smoke profile's FashionMTL runs: sequential against a Dask LocalCluster of 2 worker processes, and the
per-run overhead of the claim and of the scheduler.

    python benchmarks/bench_executor.py [--runs 8] [--epochs N] [--data-root DIR]

Each configuration trains the same grid into a fresh results folder. Sequential runs use torch's thread count of this
process (all cores) and, for comparison, 1 thread; the cluster's workers get cores // 2 threads each. The cluster's
start is timed apart from the grid, and both sides first train a few other runs (each worker reads the data and
imports its modules once) before the clock starts. The overheads: a claim taken and released (with its
heartbeat thread), and a Dask task's round trip to a worker, both per run, against the mean wall time of one of the
grid's runs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from mtlcore.book import profile_parameters
from mtlcore.training import claims, ensure_runs, grid, load_run
from mtlcore.training.runner import base_config
from mtlcore.training.executor import Executor, close_all


def configs(runs: int, epochs: int | None = None, first_seed: int = 0) -> list:
    """`runs` runs of the smoke profile's §3 configuration (its sizes, model and factor measurements): the target
    alone and with each partner, over seeds from `first_seed`."""
    p = profile_parameters("smoke")["sec3_transfer"]
    base = {**base_config(p), **({"epochs": epochs} if epochs else {})}
    task_sets = [[p["target"]]] + [[p["target"], q] for q in p["partners"]]
    seeds = list(range(first_seed, first_seed + max(1, -(-runs // len(task_sets)))))
    return grid(base, tasks=task_sets, seed=seeds)[:runs]


def timed_grid(runs: list, executor: str, data_root: str | None) -> tuple[float, float]:
    """(wall seconds of the grid, mean wall seconds of one run as its file records)."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = ensure_runs(runs, folder, data_root=data_root, executor=executor, progress=False)
        wall = time.perf_counter() - start
        per_run = sum(float(load_run(p).attrs["wall_seconds"]) for p in paths) / len(paths)
    return wall, per_run


def claim_seconds(n: int = 200) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.claim"
        start = time.perf_counter()
        for _ in range(n):
            with claims.acquire(path):
                pass
        return (time.perf_counter() - start) / n


def scheduler_seconds(client, n: int = 200) -> float:
    start = time.perf_counter()
    client.gather(client.map(abs, range(n), pure=False))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="default: the smoke profile's")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    runs = configs(args.runs, args.epochs)
    print(f"{len(runs)} runs of the smoke profile's §3 ({runs[0].epochs} epochs, factors measured), "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start")
    warm_up = configs(4, 1, first_seed=1000)  # other runs: data read and modules imported before the clock starts
    ensure_runs(warm_up, tempfile.mkdtemp(), data_root=args.data_root, progress=False)

    threads = torch.get_num_threads()
    sequential, per_run = timed_grid(runs, "sequential", args.data_root)
    torch.set_num_threads(1)
    sequential_1, _ = timed_grid(runs, "sequential", args.data_root)
    torch.set_num_threads(threads)

    cluster = Executor.parse("processes:2")
    start = time.perf_counter()
    client = cluster.client()
    client.wait_for_workers(2)
    started = time.perf_counter() - start
    ensure_runs(warm_up, tempfile.mkdtemp(), data_root=args.data_root, executor=str(cluster), progress=False)
    parallel, _ = timed_grid(runs, str(cluster), args.data_root)
    scheduler = scheduler_seconds(client)
    close_all()
    claim = claim_seconds()

    print("| configuration | grid wall (s) | speed-up over sequential |")
    print("|---|---:|---:|")
    print(f"| sequential, {threads} torch threads | {sequential:.1f} | 1.00× |")
    print(f"| sequential, 1 torch thread | {sequential_1:.1f} | {sequential / sequential_1:.2f}× |")
    print(f"| `processes:2`, {cluster.torch_threads()} thread each (cluster already started) | {parallel:.1f} | "
          f"{sequential / parallel:.2f}× |")
    print(f"| `processes:2`, its start included | {parallel + started:.1f} | {sequential / (parallel + started):.2f}× |")
    print()
    print(f"mean run (sequential): {per_run:.2f} s; cluster start {started:.1f} s")
    print(f"claim per run: {claim * 1e3:.2f} ms = {100 * claim / per_run:.3f}% of a run")
    print(f"scheduler round trip per run: {scheduler * 1e3:.2f} ms = {100 * scheduler / per_run:.3f}% of a run")
    print(f"load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
