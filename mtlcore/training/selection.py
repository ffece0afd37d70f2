"""Choosing the training configuration on validation (paper A, §3 and Appendix A): a grid of run-config values
(learning rate, batch size, optimizer, ...) is trained on a few seeds for every task set of an experiment, and the
grid point whose runs validate best is chosen for the seeds of the experiment itself.

"Best" must compare tasks whose scores differ in scale and direction (an accuracy, an error), and single-task with
multi-task runs, which the paper trains with one shared configuration. So each (task set, task, seed) cell ranks the
grid points by its best validation score over the trained epochs (in the score's direction, 1 = best; a run that
diverged ranks last), and the chosen point has the lowest mean rank over all cells (ties: the first in grid order),
the mean rank of paper B's comparisons. The selection runs measure no trajectory factor unless asked to.

`search` tunes several methods each on its own (paper B): one `select` per aggregator over a shared grid (learning
rate, regularisation) times the method's own options.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mtlcore._seeding import numpy_rng
from mtlcore.training.config import ConfigError, RunConfig
from mtlcore.training.runner import grid, load_runs

SELECTION_KEYS = ("grid", "seeds", "task_sets")
SEARCH_KEYS = ("grid", "options", "seeds", "budget")


@dataclass(frozen=True)
class Selection:
    chosen: dict  # the chosen grid point: run-config field -> value
    table: pd.DataFrame  # one row per grid point: its values, mean rank, mean best validation score, diverged runs
    runs: int  # how many runs the selection trained or read
    measured: bool = False  # whether its runs measured trajectory factors


def grid_points(axes: dict | list) -> list[dict]:
    """Every combination of the `axes` (run-config field -> list of values), in grid order; or, given a list of
    points (each a mapping of run-config fields to one value, e.g. each optimizer with its own learning rate), those
    points in their order. Unknown fields, empty or non-list values and repeated points are refused, naming them."""
    if isinstance(axes, list):
        if not axes or not all(isinstance(point, dict) and point for point in axes):
            raise ConfigError("selection.grid as a list holds points, each a non-empty mapping of run-config fields "
                              "to one value (e.g. [{optimizer: adam, lr: 0.001}, {optimizer: momentum, lr: 0.01}]), "
                              f"got {axes!r}")
        for point in axes:
            grid_points({k: [v] for k, v in point.items()})  # each point's fields checked as axes are
        repeated = [point for i, point in enumerate(axes) if point in axes[:i]]
        if repeated:
            raise ConfigError(f"selection.grid lists the point(s) {repeated} more than once")
        return [dict(point) for point in axes]
    if not isinstance(axes, dict) or not axes:
        raise ConfigError("selection.grid must map run-config fields to lists of values (every combination) or list "
                          f"points, got {axes!r}")
    unknown = [k for k in axes if k not in RunConfig.fields()]
    if unknown:
        raise ConfigError(f"selection.grid: unknown run-config field(s) {unknown}; valid fields: {RunConfig.fields()}")
    fixed = [k for k in ("setting", "tasks", "seed") if k in axes]
    if fixed:
        raise ConfigError(f"selection.grid cannot vary {fixed}: the experiment fixes them")
    bad = [k for k, v in axes.items() if not isinstance(v, list) or not v]
    if bad:
        raise ConfigError(f"selection.grid: {bad} must be non-empty lists of values, e.g. lr: [0.01, 0.001]")
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def check_selection(spec: dict) -> None:
    """Refuse a malformed `selection:` block (unknown keys, a bad grid, no seeds) before anything trains."""
    unknown = sorted(set(spec) - set(SELECTION_KEYS))
    if unknown:
        raise ConfigError(f"selection: unknown key(s) {unknown}; valid keys: {list(SELECTION_KEYS)}")
    grid_points(spec.get("grid"))
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"selection.seeds={seeds!r} must be a non-empty list of seeds")
    task_sets = spec.get("task_sets", [["?"]])
    if not (isinstance(task_sets, list) and task_sets and all(isinstance(t, list) and t for t in task_sets)):
        raise ConfigError(f"selection.task_sets={task_sets!r} must be a non-empty list of task lists")


def _best_validation(values: np.ndarray, higher_is_better: bool) -> float:
    trained = values[1:]  # epoch 0, the untrained model, is the same for every grid point
    trained = trained[np.isfinite(trained)]
    if trained.size == 0:
        return np.nan
    return float(trained.max() if higher_is_better else trained.min())


def rank_points(scores: np.ndarray, higher_is_better: np.ndarray) -> np.ndarray:
    """Ranks (1 = best, ties averaged) of the grid points in each cell: `scores` is points × cells, NaN (a run
    that diverged or never scored) ranks last; `higher_is_better` gives each cell's direction."""
    oriented = np.where(np.asarray(higher_is_better, dtype=bool)[None, :], -scores, scores)
    oriented = np.where(np.isfinite(oriented), oriented, np.inf)
    return np.apply_along_axis(stats.rankdata, 0, oriented)


def select(base: dict, spec: dict, task_sets: list[list[str]], results_dir: str | Path, *,
           metrics: dict | None = None, points: list[dict] | None = None, **load_kwargs) -> Selection:
    """Train the grid of `spec` (`grid:` field -> values, or a list of points; `seeds:` the selection's seeds, default
    [0]; `task_sets:` the task sets to select on, default `task_sets`) over `base` (a run config; the selection runs measure no
    factor unless `metrics` names some) and choose a point; `points`: some of the grid's points only (a budgeted
    search's draw); `load_kwargs` go to `load_runs` (data root, executor)."""
    check_selection(spec)
    points = grid_points(spec["grid"]) if points is None else points
    seeds = spec.get("seeds", [0])
    task_sets = spec.get("task_sets") or task_sets
    base = {**base, "metrics": metrics or {}}
    configs = [(p, c) for p, point in enumerate(points) for c in grid({**base, **point}, tasks=task_sets, seed=seeds)]
    runs = load_runs([c for _, c in configs], results_dir, **load_kwargs)
    by_id = {str(r): i for i, r in enumerate(runs["run"].values)}  # run coordinate: the config's content hash
    cells: dict[tuple, dict[int, float]] = {}
    directions: dict[tuple, bool] = {}
    diverged = np.zeros(len(points), dtype=int)
    for p, config in configs:
        i = by_id[config.content_hash()]
        complete = str(runs["status"].values[i]) == "complete"
        diverged[p] += not complete
        for task in config.tasks:
            cell = (json.dumps(list(config.tasks)), task, config.seed)
            higher = bool(runs["higher_is_better"].sel(task=task).values)
            score = runs["val_score"].isel(run=i).sel(task=task).values
            cells.setdefault(cell, {})[p] = _best_validation(np.asarray(score, float), higher) if complete else np.nan
            directions[cell] = higher
    keys = list(cells)
    scores = np.array([[cells[k].get(p, np.nan) for k in keys] for p in range(len(points))])
    ranks = rank_points(scores, np.array([directions[k] for k in keys]))
    mean_rank = ranks.mean(axis=1)
    table = pd.DataFrame(points)
    table["mean rank"] = mean_rank
    if len(set(directions.values())) == 1:  # one direction: the plain mean of the best validation scores is readable
        finite = np.isfinite(scores)  # over the runs that completed; NaN for a point whose runs all diverged
        counts = finite.sum(axis=1)
        table["mean best validation score"] = np.where(counts, np.where(finite, scores, 0).sum(axis=1) / np.maximum(counts, 1), np.nan)
    table["diverged runs"] = diverged
    best = int(np.argmin(mean_rank))  # the first of equal ranks
    table["chosen"] = ["✔" if p == best else "" for p in range(len(points))]
    return Selection(chosen=points[best], table=table, runs=len(configs),
                     measured=bool((metrics or {}).get("factors")))


def describe(selection: Selection) -> str:
    """One markdown sentence: what was chosen, from how many runs."""
    chosen = ", ".join(f"`{k}` = {v}" for k, v in selection.chosen.items())
    return (f"Chosen on validation: {chosen} (the lowest mean rank over every task, task set and selection seed; "
            f"{len(selection.table)} grid points, {selection.runs} runs"
            f"{'' if selection.measured else ' without factor measurements'}).")


def method_grid(axes: dict, method: str, options: dict | None = None) -> dict:
    """The grid of one method in a search: the shared `axes` (learning rate, regularisation, ...) with `aggregator`
    set to `method` and, when `options` (option -> values) are given, `aggregator_options` over every combination."""
    if isinstance(axes, list):
        raise ConfigError("search.grid must map run-config fields to lists of values (a search crosses them with each "
                          "method's options); a list of points is for `selection:` only")
    grid_points(axes)  # the shared axes alone are checked first, so that their errors name them
    if "aggregator" in axes or "aggregator_options" in axes:
        raise ConfigError("search.grid cannot vary `aggregator` or `aggregator_options`: the search sets them per "
                          "method (its `options:` block holds each method's own option grid)")
    out = {**axes, "aggregator": [method]}
    if options:
        out["aggregator_options"] = [dict(zip(options, values))
                                     for values in itertools.product(*_option_lists(method, options))]
    return out


def _option_lists(method: str, options: dict) -> list[list]:
    bad = [k for k, v in options.items() if not isinstance(v, list) or not v]
    if bad:
        raise ConfigError(f"search.options.{method}: {bad} must be non-empty lists of values, e.g. c: [0.2, 0.5]")
    return list(options.values())


def check_search(spec: dict, methods: list[str]) -> None:
    """Refuse a malformed `search:` block before anything trains: unknown keys, a bad shared grid, option grids for
    methods the search does not run, no seeds."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search must be a mapping with keys {list(SEARCH_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(SEARCH_KEYS))
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; valid keys: {list(SEARCH_KEYS)}")
    options = spec.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError(f"search.options must map a method to its option grid (option -> values), got {options!r}")
    outside = sorted(set(options) - set(methods))
    if outside:
        raise ConfigError(f"search.options names {outside}, which the search does not run; methods: {methods}")
    for method in methods:
        method_grid(spec.get("grid"), method, options.get(method))
    check_selection({"grid": spec["grid"], "seeds": spec.get("seeds", [0])})
    budget = spec.get("budget")
    if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1):
        raise ConfigError(f"search.budget={budget!r} must be a positive integer (grid points per method) or null "
                          "(the whole grid)")


def budgeted(points: list[dict], budget: int | None, method: str) -> list[dict]:
    """A budgeted random search's points of one method: `budget` of its grid `points` drawn without replacement
    (seeded by the method's name alone, so a rerun draws the same), kept in grid order; all of them when the grid
    has no more than `budget` points or `budget` is None."""
    if budget is None or len(points) <= budget:
        return list(points)
    chosen = numpy_rng(0, "search-budget", method).choice(len(points), size=budget, replace=False)
    return [points[i] for i in sorted(chosen)]


def search(base: dict, methods: list[str], spec: dict, task_sets: list[list[str]], results_dir: str | Path, *,
           metrics: dict | None = None, **load_kwargs) -> dict[str, Selection]:
    """Tune each method on its own (paper B): for every aggregator in `methods`, the grid of `spec["grid"]` (shared
    axes such as `lr` and `weight_decay`) times the method's own options in `spec["options"][method]` (e.g.
    `cagrad: {c: [0.2, 0.5, 0.8]}`) is trained on `spec["seeds"]` (default [0]) for `task_sets` and chosen by
    `select`'s rule: the lowest mean rank of the best validation score over every (task set, task, seed) cell, the
    first in grid order among equal ranks. Runs are cached by content hash, so a second call trains nothing and a
    killed one resumes. `spec["budget"]`: at most that many grid points per method, drawn at random (`budgeted`).
    `metrics`: factors the search runs measure (none by default). Method -> its `Selection`."""
    check_search(spec, list(methods))
    options = spec.get("options") or {}
    selection = {"seeds": spec.get("seeds", [0])}
    out = {}
    for method in methods:
        axes = method_grid(spec["grid"], method, options.get(method))
        points = budgeted(grid_points(axes), spec.get("budget"), method)
        out[method] = select(base, {**selection, "grid": axes}, task_sets, results_dir, metrics=metrics,
                             points=points, **load_kwargs)
    return out
