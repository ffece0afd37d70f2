"""Paper A's Appendix C: per-task results with every score of the task, STL against MTL, Δ with its ±2 std
significance."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore.analysis import comparisons, trajectories


def score_summaries(runs: xr.Dataset, k: int = 10) -> xr.Dataset:
    """For the runs of one task (dims run, epoch, score): each score's mean test value at the `k` trained checkpoints
    of best primary validation score (the generalization of Appendix B.4, for every score the task has). One variable
    per score the task has, each carrying its direction as the coordinate `higher_is_better`."""
    if "task" in runs.dims:
        raise ValueError("score_summaries takes the runs of one task: select it first (runs.sel(task=...))")
    val, direction = comparisons._trained(runs["val_score"]), bool(comparisons.orientation(runs["val_score"]) > 0)
    out = {}
    for score in runs["score"].values:
        test = comparisons._trained(runs["test_scores"].sel(score=score))
        if not bool(test.notnull().any()):
            continue  # a score of another task of the runs
        summary = trajectories.best_validation_mean(val, test, k=k, higher_is_better=direction)
        higher = bool(runs["score_higher_is_better"].sel(score=score)) if "score_higher_is_better" in runs.coords else True
        out[str(score)] = comparisons._completed(summary, runs).drop_vars(
            [c for c in summary.coords if c not in ("run",)], errors="ignore").assign_coords(higher_is_better=int(higher))
    return xr.Dataset(out)


def task_table(runs: xr.Dataset, labels: xr.DataArray, reference: str = "STL", k: int = 10) -> pd.DataFrame:
    """Per configuration of one task's runs: every score's seed mean, std, Δ to `reference` (oriented: positive is
    better) and its significance (`comparisons.delta_table`)."""
    summaries = score_summaries(runs, k)
    return comparisons.delta_table(summaries, labels, reference, scores=tuple(summaries.data_vars))


def shown_task_table(table: pd.DataFrame, percent: Mapping[str, bool], reference: str = "STL") -> pd.DataFrame:
    """`task_table` as the appendix prints it: mean ± std per score (rates in points), Δ with ✱ when significant."""
    scores = [c for c in table.columns if f"{c}_std" in table.columns and f"delta_{c}" in table.columns]
    out = pd.DataFrame(index=table.index)
    for score in scores:
        scale = 100.0 if percent.get(score) else 1.0
        out[score] = [f"{m * scale:.2f} ± {s * scale:.2f}" if np.isfinite(m) else "–"
                      for m, s in zip(table[score], table[f"{score}_std"])]
        out[f"Δ {score}"] = ["" if label == reference else f"{d * scale:+.2f}" + (" ✱" if sig else "")
                             for label, d, sig in zip(table.index, table[f"delta_{score}"], table[f"significant_{score}"])]
    out["seeds"] = table["seeds"].values
    return out
