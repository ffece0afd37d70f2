"""Run a grid of runs: skip what is on disk, train the rest locally or on Dask, keep going past divergence and
failures, and share a results folder with other processes without training a run twice."""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import xarray as xr
from tqdm import tqdm

from mtlcore.training.claims import STALE_AFTER, RunClaimed, RunFailed, first_line, read_failure
from mtlcore.training.config import RunConfig
from mtlcore.training.results import check_results_dir, combine_runs, load_run

PROGRESS_ENV = "MTLCORE_PROGRESS_FILE"
CACHED_ONLY_ENV = "MTLCORE_CACHED_ONLY"

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
             claim_timeout: float) -> tuple[str, str | dict | None]:
    """Train `config` unless it is done or claimed: ("done", its status), ("busy", None) or ("failed", its record)."""
    from mtlcore.training import trainer  # imported in the worker process

    path = trainer.run_path(config, results_dir)
    try:
        ds = trainer.run(config, data_root=data_root, results_dir=results_dir, progress=progress, wait=False,
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
    return "done", str(ds.attrs.get("status"))


class RunsMissing(ValueError):
    """Runs that are not on disk where training was ruled out (`cached_only`)."""


def _label(config: RunConfig) -> str:
    return f"{config.mode} {'+'.join(config.tasks)} {config.aggregator} seed {config.seed}"


class RunProgress:
    """The counts of a call of `ensure_runs`, shown as a bar (cached / trained / diverged / failed / running) and
    appended as JSON lines to ``$MTLCORE_PROGRESS_FILE`` where `mtlcore batch` follows its notebooks."""

    def __init__(self, total: int, cached: int, failed_before: int, show: bool, diverged_cached: int = 0):
        self.counts = {"total": total, "cached": cached, "trained": 0, "diverged": diverged_cached,
                       "failed": failed_before, "running": 0}
        self.file = os.environ.get(PROGRESS_ENV)
        self.bar = tqdm(total=total, initial=cached + failed_before, desc="runs", disable=not show, leave=False)
        self._emit("start")

    def _emit(self, event: str, label: str = "") -> None:
        self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.counts.items() if k != "total" and v)
                                 + (f" | {label}" if label else ""), refresh=True)
        if self.file:
            with open(self.file, "a") as handle:
                handle.write(json.dumps({"event": event, "label": label, **self.counts}) + "\n")

    def running(self, count: int, label: str = "") -> None:
        self.counts["running"] = count
        self._emit("running", label)

    def finished(self, outcome: str, detail, label: str) -> None:
        if outcome == "failed":
            self.counts["failed"] += 1
        else:
            self.counts["trained"] += 1
            self.counts["diverged"] += detail != "complete"
        self.counts["running"] = max(0, self.counts["running"] - 1)
        self.bar.update(1)
        self._emit("finished", label)

    def close(self) -> str:
        self.bar.close()
        c = self.counts
        summary = (f"{c['total']} runs: {c['cached']} on disk, {c['trained']} trained, {c['diverged']} diverged "
                   f"(kept, status 'diverged'), {c['failed']} failed")
        self._emit("end")
        return summary


def ensure_runs(configs: Iterable[RunConfig], results_dir: str | Path, *, data_root: str | Path | None = None,
                executor=None, dask_client=None, progress: bool = True,
                retry_failed: bool = False, claim_timeout: float = STALE_AFTER, poll_seconds: float = 5.0,
                cached_only: bool | None = None) -> list[Path]:
    """Make sure every config has a finished run file under `results_dir/runs/`; return the paths.

    `executor` says where the missing runs train (`mtlcore.training.executor`: "sequential", "processes:N", a
    scheduler address, "slurm:FILE" or "pbs:FILE"; None: ``$MTLCORE_EXECUTOR``, else sequential); `dask_client`, a
    client of your own, overrides it. Paths are made absolute before anything is submitted. A diverged run is saved
    with status "diverged" and the others go on. Configs that resolve to the same run (same content hash, e.g.
    `seed: [0, 0]` or `lr: [0.01, 1.0e-2]`) are trained and returned once, so a repeated value never counts as two
    seeds. `cached_only` (None: ``$MTLCORE_CACHED_ONLY``): train nothing, and raise `RunsMissing` if a run is not
    on disk (a book built from runs precomputed elsewhere).

    Several processes may share `results_dir`: a run another live process is training is left for later and
    waited for (polling every `poll_seconds`), so each run is trained once (see `trainer.run` for the claims and
    `claim_timeout`). A run that raises is recorded in `<hash>.failed.json` and the others go on; at the end
    `RunsFailed` lists the failed runs. A run recorded as failed by an earlier call is reported again, not
    retrained, unless `retry_failed`. The end logs a summary: runs on disk, trained, diverged and failed.
    """
    from mtlcore.training.executor import Executor
    from mtlcore.training.trainer import failure_path, run_path, set_aside_if_stale

    chosen = Executor.parse(executor)
    check_results_dir(results_dir)
    results_dir = str(Path(results_dir).expanduser().resolve())  # workers may start elsewhere
    root = None if data_root is None else str(Path(data_root).expanduser().resolve())
    if cached_only is None:
        cached_only = os.environ.get(CACHED_ONLY_ENV, "") not in ("", "0")
    configs = list(configs)
    unique: dict[Path, RunConfig] = {}
    for config in configs:
        unique.setdefault(run_path(config, results_dir), config)
    if len(unique) < len(configs):
        log.warning("%d of the %d configs repeat another one (same run hash): each run is trained and counted once",
                    len(configs) - len(unique), len(configs))
    paths = list(unique)
    # one read of each run file on disk: its status, unless its data files changed since (then it trains again)
    statuses = {path: set_aside_if_stale(path, root) for path in paths}
    todo = {p: c for p, c in unique.items() if not p.exists()}
    failed: dict[Path, dict] = {}
    if not retry_failed:
        for path in list(todo):
            record = read_failure(failure_path(path))
            if record is not None:
                failed[path] = record
                del todo[path]
    if todo and cached_only:
        raise RunsMissing(f"{len(todo)} of {len(paths)} runs are not in {results_dir}/runs and training is ruled "
                          f"out (cached_only / ${CACHED_ONLY_ENV}), e.g. {_label(next(iter(todo.values())))}: "
                          "precompute them where they can train (`mtlcore batch --profile P --executor ...`) and "
                          "copy the results folder here")
    diverged = sum(statuses[p] != "complete" for p in paths if p not in todo and p not in failed)
    followed = bool(os.environ.get(PROGRESS_ENV))  # `mtlcore batch` shows the bar and the summary instead
    bar = RunProgress(len(paths), len(paths) - len(todo) - len(failed), len(failed), progress and not followed,
                      diverged)
    options = {"results_dir": results_dir, "data_root": root, "retry_failed": retry_failed,
               "claim_timeout": claim_timeout}
    client = dask_client if dask_client is not None else chosen.client() if chosen.distributed else None
    try:
        while todo:
            busy = {}
            if client is None:  # one at a time, in this process
                for path, config in todo.items():
                    bar.running(1, _label(config))
                    outcome, detail = _attempt(config, progress=progress and not followed, **options)
                    if outcome == "busy":
                        busy[path] = config
                        bar.running(0)
                        continue
                    bar.finished(outcome, detail, _label(config))
                    if outcome == "failed":
                        failed[path] = detail
            else:
                from distributed import as_completed

                futures = client.map(_attempt, list(todo.values()), progress=False, pure=False, **options)
                where = {future.key: path for future, path in zip(futures, todo)}
                bar.running(len(futures))
                for future in as_completed(futures):
                    path = where[future.key]
                    outcome, detail = future.result()
                    if outcome == "busy":
                        busy[path] = todo[path]
                        bar.running(bar.counts["running"] - 1)
                        continue
                    bar.finished(outcome, detail, _label(todo[path]))
                    if outcome == "failed":
                        failed[path] = detail
            if busy:
                log.info("%d runs are being trained by other processes; checking again in %.0f s",
                         len(busy), poll_seconds)
                time.sleep(poll_seconds)
            todo = busy
    finally:
        summary = bar.close()
    if progress and not followed:
        print(summary, file=sys.stderr)
    (log.warning if bar.counts["failed"] or bar.counts["diverged"] else log.info)("%s (results %s)", summary,
                                                                                 results_dir)
    if failed:
        raise RunsFailed(failed, len(paths))
    return paths


def load_runs(configs: Iterable[RunConfig], results_dir: str | Path, *, lazy: bool = False, **kwargs) -> xr.Dataset:
    """`ensure_runs`, then combine the run files along a `run` dimension (`lazy`: Dask arrays read from the files
    when computed, for more runs than fit in memory). Raises `RunsFailed` when some runs failed (the others are
    saved), rather than combining fewer runs than asked for."""
    return combine_runs(ensure_runs(configs, results_dir, **kwargs), lazy=lazy)


def diverged_runs(combined: xr.Dataset) -> list[str]:
    return [str(r) for r, s in zip(combined["run"].values, combined["status"].values) if s != "complete"]


__all__ = ["base_config", "grid", "ensure_runs", "load_runs", "load_run", "diverged_runs", "RunsFailed", "RunsMissing"]
