"""Run a grid of runs: skip what is on disk, train the rest locally or on Dask, keep going past divergence."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

import xarray as xr
from tqdm import tqdm

from mtlcore.training.config import RunConfig
from mtlcore.training.results import combine_runs, load_run

log = logging.getLogger(__name__)


def base_config(parameters: dict) -> dict:
    """The run-config part of a notebook's parameters (pass `globals()` from a notebook): every key that is a
    field of `RunConfig`, so a new field needs no list to be updated here."""
    return {key: parameters[key] for key in RunConfig.fields() if key in parameters}


def grid(base: dict, **axes: Iterable) -> list[RunConfig]:
    """Every combination of the `axes` values over the `base` config (validated before anything runs)."""
    for key, values in axes.items():  # any iterable but a string or mapping: lists, ranges, arrays
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise ValueError(f"grid: {key}={values!r} must be a non-empty list of values, e.g. {key}: [{values}]")
    values = {key: list(v) for key, v in axes.items()}
    empty = [key for key, v in values.items() if not v]
    if empty:
        raise ValueError(f"grid: {empty[0]} has no values; give at least one")
    return [RunConfig.from_dict({**base, **dict(zip(values, combination))})
            for combination in itertools.product(*values.values())]


def _run_one(config: RunConfig, results_dir: str, data_root: str | None, progress: bool) -> str:
    from mtlcore.training import trainer  # imported in the worker process

    trainer.run(config, data_root=data_root, results_dir=results_dir, progress=progress)
    return str(trainer.run_path(config, results_dir))


def ensure_runs(configs: Iterable[RunConfig], results_dir: str | Path, *, data_root: str | Path | None = None,
                executor: str = "local", dask_client=None, progress: bool = True) -> list[Path]:
    """Make sure every config has a finished run file under `results_dir/runs/`; return the paths.

    `executor="dask"` maps the missing runs over `dask_client` (or a new local `distributed.Client`).
    A diverged run is saved with status "diverged" and the others go on. Configs that resolve to the same
    run (same content hash, e.g. `seed: [0, 0]` or `lr: [0.01, 1.0e-2]`) are trained and returned once,
    so a repeated value never counts as two seeds.
    """
    from mtlcore.training.trainer import run_path

    results_dir = str(results_dir)
    root = None if data_root is None else str(data_root)
    configs = list(configs)
    unique: dict[Path, RunConfig] = {}
    for config in configs:
        unique.setdefault(run_path(config, results_dir), config)
    if len(unique) < len(configs):
        log.warning("%d of the %d configs repeat another one (same run hash): each run is trained and counted once",
                    len(configs) - len(unique), len(configs))
    paths, configs = list(unique), list(unique.values())
    todo = [c for c, p in zip(configs, paths) if not p.exists()]
    log.info("%d runs requested, %d on disk, %d to train", len(configs), len(configs) - len(todo), len(todo))
    if todo and executor == "local":
        for config in tqdm(todo, desc="runs", disable=not progress):
            _run_one(config, results_dir, root, progress)
    elif todo and executor == "dask":
        from distributed import Client, as_completed

        client = dask_client or Client(processes=True, threads_per_worker=1)
        try:
            futures = client.map(_run_one, todo, results_dir=results_dir, data_root=root, progress=False, pure=False)
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs (dask)", disable=not progress):
                future.result()
        finally:
            if dask_client is None:  # ours: close it, or its workers outlive the call (and warn when killed)
                client.close()
    elif todo:
        raise ValueError(f"executor={executor!r}; use 'local' or 'dask'")
    return paths


def load_runs(configs: Iterable[RunConfig], results_dir: str | Path, **kwargs) -> xr.Dataset:
    """`ensure_runs`, then combine the run files along a `run` dimension."""
    return combine_runs(ensure_runs(configs, results_dir, **kwargs))


def diverged_runs(combined: xr.Dataset) -> list[str]:
    return [str(r) for r, s in zip(combined["run"].values, combined["status"].values) if s != "complete"]


__all__ = ["base_config", "grid", "ensure_runs", "load_runs", "load_run", "diverged_runs"]
