"""Run a grid of runs: skip what is on disk, train the rest locally or on Dask, keep going past divergence and
failures, and share a results folder with other processes without training a run twice."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import xarray as xr
from tqdm import tqdm

from mtlcore.training.claims import STALE_AFTER, RunClaimed, RunFailed, first_line, read_failure
from mtlcore.training.config import RunConfig
from mtlcore.training.results import check_results_dir, combine_runs, load_run

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


class RunsFailed(RuntimeError):
    """Some runs of a sweep failed; the others are on disk. `failed`: run file path -> failure record."""

    def __init__(self, failed: dict[Path, dict], total: int):
        self.failed = failed
        lines = [f"  {path.name}: {record.get('type')}: {first_line(record.get('message', ''))}"
                 for path, record in failed.items()]
        super().__init__(f"{len(failed)} of {total} runs failed (each error is in <run>.failed.json next to the "
                         "run file); the others are saved. Fix the cause and retry them with retry_failed=True "
                         "(mtlcore sweep --retry-failed):\n" + "\n".join(lines))


def _attempt(config: RunConfig, results_dir: str, data_root: str | None, progress: bool, retry_failed: bool,
             claim_timeout: float) -> tuple[str, dict | None]:
    """Train `config` unless it is done or claimed: ("done", None), ("busy", None) or ("failed", its record)."""
    from mtlcore.training import trainer  # imported in the worker process

    path = trainer.run_path(config, results_dir)
    try:
        trainer.run(config, data_root=data_root, results_dir=results_dir, progress=progress, wait=False,
                    retry_failed=retry_failed, claim_timeout=claim_timeout)
    except RunClaimed:
        return "busy", None
    except RunFailed as error:
        return "failed", error.record
    except Exception as error:
        log.error("run %s failed (recorded in %s): %s: %s", path.name, trainer.failure_path(path).name,
                  type(error).__name__, first_line(str(error)))
        return "failed", read_failure(trainer.failure_path(path)) or {"type": type(error).__name__,
                                                                      "message": str(error)}
    return "done", None


def ensure_runs(configs: Iterable[RunConfig], results_dir: str | Path, *, data_root: str | Path | None = None,
                executor: str = "local", dask_client=None, progress: bool = True, retry_failed: bool = False,
                claim_timeout: float = STALE_AFTER, poll_seconds: float = 5.0) -> list[Path]:
    """Make sure every config has a finished run file under `results_dir/runs/`; return the paths.

    `executor="dask"` maps the missing runs over `dask_client` (or a new local `distributed.Client`).
    A diverged run is saved with status "diverged" and the others go on. Configs that resolve to the same
    run (same content hash, e.g. `seed: [0, 0]` or `lr: [0.01, 1.0e-2]`) are trained and returned once,
    so a repeated value never counts as two seeds.

    Several processes may share `results_dir`: a run another live process is training is left for later and
    waited for (polling every `poll_seconds`), so each run is trained once (see `trainer.run` for the claims and
    `claim_timeout`). A run that raises is recorded in `<hash>.failed.json` and the others go on; at the end
    `RunsFailed` lists the failed runs. A run recorded as failed by an earlier call is reported again, not
    retrained, unless `retry_failed`.
    """
    from mtlcore.training.trainer import failure_path, run_path

    if executor not in ("local", "dask"):
        raise ValueError(f"executor={executor!r}; use 'local' or 'dask'")
    check_results_dir(results_dir)
    results_dir = str(results_dir)
    root = None if data_root is None else str(data_root)
    configs = list(configs)
    unique: dict[Path, RunConfig] = {}
    for config in configs:
        unique.setdefault(run_path(config, results_dir), config)
    if len(unique) < len(configs):
        log.warning("%d of the %d configs repeat another one (same run hash): each run is trained and counted once",
                    len(configs) - len(unique), len(configs))
    paths = list(unique)
    todo = {p: c for p, c in unique.items() if not p.exists()}
    failed: dict[Path, dict] = {}
    if not retry_failed:
        for path in list(todo):
            record = read_failure(failure_path(path))
            if record is not None:
                failed[path] = record
                del todo[path]
    log.info("%d runs requested, %d on disk, %d failed before, %d to train", len(paths),
             len(paths) - len(todo) - len(failed), len(failed), len(todo))
    if todo:
        options = {"results_dir": results_dir, "data_root": root, "retry_failed": retry_failed,
                   "claim_timeout": claim_timeout}
        if executor == "local":
            def attempt_all(batch):
                return (_attempt(config, progress=progress, **options) for config in batch)  # one at a time
        else:
            from distributed import Client

            client = dask_client or Client(processes=True, threads_per_worker=1)

            def attempt_all(batch):
                return client.gather(client.map(_attempt, batch, progress=False, pure=False, **options))
        try:
            with tqdm(total=len(todo), desc="runs", disable=not progress) as bar:
                while todo:
                    busy = {}
                    for (path, config), (outcome, record) in zip(list(todo.items()), attempt_all(list(todo.values()))):
                        if outcome == "busy":
                            busy[path] = config
                        else:
                            bar.update(1)
                            if outcome == "failed":
                                failed[path] = record
                    if busy:
                        log.info("%d runs are being trained by other processes; checking again in %.0f s",
                                 len(busy), poll_seconds)
                        time.sleep(poll_seconds)
                    todo = busy
        finally:
            if executor == "dask" and dask_client is None:  # ours: close it, or its workers outlive the call
                client.close()
    if failed:
        raise RunsFailed(failed, len(paths))
    return paths


def load_runs(configs: Iterable[RunConfig], results_dir: str | Path, **kwargs) -> xr.Dataset:
    """`ensure_runs`, then combine the run files along a `run` dimension. Raises `RunsFailed` when some runs
    failed (the others are saved), rather than combining fewer runs than asked for."""
    return combine_runs(ensure_runs(configs, results_dir, **kwargs))


def diverged_runs(combined: xr.Dataset) -> list[str]:
    return [str(r) for r, s in zip(combined["run"].values, combined["status"].values) if s != "complete"]


__all__ = ["base_config", "grid", "ensure_runs", "load_runs", "load_run", "diverged_runs", "RunsFailed"]
