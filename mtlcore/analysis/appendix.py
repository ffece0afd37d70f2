"""Paper A's Appendix C: per-task results with every score of the task, STL against MTL, Δ with its ±2 std
significance."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore.analysis import comparisons, trajectories
from mtlcore.settings.base import Score


def score_summaries(runs: xr.Dataset, scores: Sequence[Score], k: int = 10) -> xr.Dataset:
    """For the runs of one task (dims run, epoch, score): each of the task's `scores` (its `Setting.task(...).scores`,
    the first primary) as its mean test value at the `k` trained checkpoints of best primary validation score (the
    generalization of Appendix B.4, for every score). One variable per score (dim `run`); NaN for a run that did not
    complete."""
    if "task" in runs.dims:
        raise ValueError("score_summaries takes the runs of one task: select it first (runs.sel(task=...))")
    missing = [s.name for s in scores if s.name not in runs["score"].values]
    if missing:
        raise ValueError(f"scores {missing} are not in the runs; their scores: {list(runs['score'].values)}")
    val = comparisons._trained(runs["val_score"])
    out = {}
    for score in scores:
        test = comparisons._trained(runs["test_scores"].sel(score=score.name, drop=True))
        summary = trajectories.best_validation_mean(val, test, k=k, higher_is_better=scores[0].higher_is_better)
        summary = comparisons._completed(summary, runs)
        out[score.name] = summary.drop_vars([c for c in summary.coords if c != "run"])
    return xr.Dataset(out)


def task_table(runs: xr.Dataset, labels: xr.DataArray, scores: Sequence[Score], reference: str = "STL",
               k: int = 10) -> pd.DataFrame:
    """Per configuration of one task's runs: every score's seed mean, std, Δ to `reference` (oriented by the score's
    direction: positive is better) and its significance (`comparisons.delta_table`)."""
    table = comparisons.delta_table(score_summaries(runs, scores, k), labels, reference, scores=())
    for score in scores:  # Δ = MTL − STL; for a lower-is-better score STL − MTL, so that positive is better
        if not score.higher_is_better:
            table[f"delta_{score.name}"] = -table[f"delta_{score.name}"]
    return table


def shown_task_table(table: pd.DataFrame, scores: Sequence[Score], reference: str = "STL") -> pd.DataFrame:
    """`task_table` as the appendix prints it: mean ± std per score (rates in points), Δ with ✱ when significant."""
    out = pd.DataFrame(index=table.index)
    for score in scores:
        name, scale = score.name, 100.0 if score.percent else 1.0
        out[name] = [f"{m * scale:.2f} ± {sd * scale:.2f}" if np.isfinite(m) else "–"
                     for m, sd in zip(table[name], table[f"{name}_std"])]
        out[f"Δ {name}"] = ["" if label == reference else f"{d * scale:+.2f}" + (" ✱" if sig else "")
                            for label, d, sig in zip(table.index, table[f"delta_{name}"], table[f"significant_{name}"])]
    out["seeds"] = table["seeds"].values
    return out
