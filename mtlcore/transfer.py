"""Comparing configurations of one setting (§3, §4): MTL vs STL and SMTOs vs the uniform gradient.

Built on `mtlcore.analysis` (summaries, Δ with ±2 std significance, %Δ); this module knows the run
datasets: their `run`/`task`/`epoch` dims and the attrs that label a configuration.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore import analysis

TASK_NAMES = {"fashion1": "Fashion1", "fashion2": "Fashion2", "noisy_fashion": "NoisyFashion", "notmnist": "NotMNIST"}
# factor -> (run variable, summary along epochs): REFERENCE §1.4's one number per trajectory.
FACTOR_SUMMARIES = {
    "sharpness": ("sharpness", "last"),
    "fisher_trace": ("fisher_trace", "top"),
    "grad_cov_trace": ("grad_cov_trace", "last"),
    "min_train_loss": ("train_loss", "min"),
}


def configuration_label(tasks: str | Sequence[str], target: str) -> str:
    """'STL' for the target alone, else 'MTL: <partners>' (tasks may be the JSON string of a run attr)."""
    tasks = json.loads(tasks) if isinstance(tasks, str) else list(tasks)
    partners = [t for t in tasks if t != target]
    if not partners:
        return "STL"
    return "MTL: " + " + ".join(TASK_NAMES.get(p, p) for p in partners)


def label_configurations(runs: xr.Dataset, target: str) -> xr.Dataset:
    """Add the `configuration` coordinate along `run` ('STL', 'MTL: <partners>')."""
    return runs.assign_coords(configuration=("run", [configuration_label(t, target) for t in runs["tasks"].values]))


def _trained(values):
    """Leave out epoch 0, the untrained model: the same for every configuration of a seed."""
    return values.sel(epoch=values["epoch"] > 0) if "epoch" in values.coords else values.isel(epoch=slice(1, None))


def _completed(summary, runs):
    """NaN for runs that did not complete (diverged), so that `delta` leaves them out."""
    return summary.where(runs["status"] == "complete") if "status" in runs.coords else summary


def generalization(val_score: xr.DataArray, test_score: xr.DataArray, k: int = 10) -> xr.DataArray:
    """One number per trajectory: mean test score at its `k` best-validation trained checkpoints (NaN for a
    run that did not complete)."""
    summary = analysis.best_validation_mean(_trained(val_score), _trained(test_score), k=k)
    return _completed(summary, val_score).rename("generalization")


def trajectory_summaries(runs: xr.Dataset, k_best: int = 10, k_last: int = 20, k_top: int = 20) -> xr.Dataset:
    """Generalization and each measured factor reduced to one number per trajectory (run, task).

    Only trained checkpoints count (epoch 0 is left out). `k_last` and `k_top` are in epochs, as REFERENCE
    §1.4's "last 20 checkpoints" of a factor measured every epoch: a factor measured every n-th epoch
    averages its ceil(k / n) last or largest values, so that the window covers the same part of training.
    Runs that did not complete (diverged) get NaN, which `delta` leaves out.
    """
    out = {"generalization": generalization(runs["val_score"], runs["test_score"], k_best)}
    trained = _trained(runs)
    epochs = trained.sizes["epoch"]
    for name, (variable, how) in FACTOR_SUMMARIES.items():
        values = trained[variable]
        others = [d for d in values.dims if d != "epoch"]
        measured = int((values.notnull().any(others) if others else values.notnull()).sum())
        k = k_last if how == "last" else k_top
        k = max(1, math.ceil(k * measured / epochs)) if epochs else k
        if how == "last":
            out[name] = analysis.last_mean(values, k=k)
        elif how == "top":
            out[name] = analysis.top_mean(values, k=k)
        else:
            out[name] = values.min("epoch", skipna=True)
    return _completed(xr.Dataset(out), runs)


def delta_table(values: xr.DataArray | xr.Dataset, labels: xr.DataArray, reference: str = "STL") -> pd.DataFrame:
    """Per configuration and quantity: Δ = mean − mean of `reference` over seeds, and ±2 std significance.

    `values` holds one number per run (a DataArray, or a Dataset of several quantities).
    """
    data = values if isinstance(values, xr.Dataset) else values.to_dataset(name=values.name or "value")
    labels = np.asarray(labels.values)
    if reference not in set(labels):
        raise ValueError(f"no run labelled {reference!r}; labels: {sorted(set(labels))}")
    counted = np.zeros(len(labels), dtype=bool)  # runs with a value in some quantity (not diverged)
    for variable in data.data_vars.values():
        counted |= np.isfinite(np.asarray(variable.values, dtype=float)).reshape(len(labels), -1).any(axis=1)
    rows = []
    for label in dict.fromkeys(labels):
        row = {"configuration": label, "seeds": int((counted & (labels == label)).sum())}
        for name, variable in data.data_vars.items():
            d = analysis.delta(variable.values[labels == label], variable.values[labels == reference])
            row.update({f"{name}": d.mtl_mean, f"{name}_std": d.mtl_std, f"delta_{name}": d.delta,
                        f"significant_{name}": label != reference and d.significant})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("configuration")
    return table.loc[[reference] + [i for i in table.index if i != reference]]


def transfer_table(summary: xr.DataArray, labels: xr.DataArray, reference: str = "STL") -> pd.DataFrame:
    """§3's table: mean, std, Δ to `reference` and significance of one summary per run."""
    table = delta_table(summary.rename("value"), labels, reference)
    return table.rename(columns={"value": "mean", "value_std": "std", "delta_value": "delta",
                                 "significant_value": "significant"})


def value_at_loss(loss: np.ndarray, values: np.ndarray, level: float) -> float:
    """`values` where the trajectory's `loss` first falls to `level` (linear in log loss between epochs)."""
    ok = np.isfinite(loss) & np.isfinite(values) & (loss > 0)
    loss, values = loss[ok], values[ok]
    below = np.nonzero(loss <= level)[0]
    if len(below) == 0:
        return float("nan")
    i = below[0]
    if i == 0:
        return float(values[0])
    a, b = np.log(loss[i - 1]), np.log(loss[i])
    t = (a - np.log(level)) / (a - b)
    return float(values[i - 1] + t * (values[i] - values[i - 1]))


def common_loss_levels(loss: np.ndarray, n_levels: int) -> np.ndarray:
    """`n_levels` geometric levels strictly inside the loss range that every trajectory (row) covers."""
    with np.errstate(invalid="ignore"):
        high = np.nanmin(np.nanmax(loss, axis=1))
        low = np.nanmax(np.nanmin(loss, axis=1))
    if not (np.isfinite(high) and np.isfinite(low)) or low >= high:
        return np.array([])
    return np.geomspace(high, low, n_levels + 2)[1:-1]


def gaps_at_loss(loss: xr.DataArray, score: xr.DataArray, labels: xr.DataArray, reference: str = "STL",
                 n_levels: int = 6, skip_first: int = 1) -> pd.DataFrame:
    """Score gaps to `reference` at common training-loss levels, with the ±2 std significance test.

    The first `skip_first` checkpoints are left out (REFERENCE §1.4: skip the very first, abnormally
    high-loss points): between the untrained model and epoch 1 the score jumps from chance, and a level
    read there by interpolation compares a straight line with a real checkpoint.
    """
    loss, score = (a.transpose("run", "epoch").isel(epoch=slice(skip_first, None)) for a in (loss, score))
    levels = common_loss_levels(loss.values, n_levels)
    labels = np.asarray(labels.values)
    ref = labels == reference
    final_ref = float(np.exp(np.nanmean(np.log([l[np.isfinite(l)][-1] for l in loss.values[ref]]))))
    rows = []
    for level in levels:
        at = np.array([value_at_loss(l, s, level) for l, s in zip(loss.values, score.values)])
        for label in dict.fromkeys(labels):
            if label == reference:
                continue
            d = analysis.delta(at[labels == label], at[ref])
            rows.append({"loss_level": level, "x_final": level / final_ref, "configuration": label,
                         "reference": d.stl_mean, "mean": d.mtl_mean, "delta": d.delta, "significant": d.significant})
    return pd.DataFrame(rows)


def smto_changes(summaries: xr.Dataset, aggregator: xr.DataArray, group: xr.DataArray,
                 reference: str = "uniform") -> pd.DataFrame:
    """§4.2: for every (group, task, SMTO), %Δ = 100·(SMTO − uniform)/|uniform| of each summary (seed
    means), and whether the change in generalization is significant (±2 std)."""
    rows = []
    aggregator, group = np.asarray(aggregator.values), np.asarray(group.values)
    for g in dict.fromkeys(group):
        base = (group == g) & (aggregator == reference)
        if not base.any():
            raise ValueError(f"group {g!r} has no {reference!r} runs to compare with")
        for method in dict.fromkeys(aggregator[(group == g) & (aggregator != reference)]):
            mine = (group == g) & (aggregator == method)
            for task in summaries["task"].values:
                s = summaries.sel(task=task)
                if not np.isfinite(s["generalization"].values[mine]).any():
                    continue
                d = analysis.delta(s["generalization"].values[mine], s["generalization"].values[base])
                row = {"group": g, "task": str(task), "aggregator": method, "significant": d.significant,
                       "generalization": float(analysis.percent_change(d.mtl_mean, d.stl_mean))}
                for name in FACTOR_SUMMARIES:
                    row[name] = float(analysis.percent_change(np.nanmean(s[name].values[mine]), np.nanmean(s[name].values[base])))
                rows.append(row)
    return pd.DataFrame(rows)


def analysis_dataset(summary: xr.DataArray, labels: xr.DataArray, table: pd.DataFrame, gaps: pd.DataFrame,
                     attrs: dict) -> xr.Dataset:
    """The §3 analysis as one dataset: per-run generalization, the transfer table, the gaps at loss levels."""
    per_run = xr.Dataset({"generalization": summary}).assign_coords(run_configuration=("run", [str(v) for v in labels.values]))
    out = xr.merge([per_run, table_dataset(table, "transfer")], compat="override")
    if len(gaps):
        gap = gaps.astype({"configuration": str, "significant": int}).copy()
        gap["level"] = gap.groupby("configuration").cumcount()
        gap_ds = xr.Dataset.from_dataframe(gap.set_index(["configuration", "level"])[["loss_level", "x_final", "mean", "delta", "significant"]])
        out = out.merge(gap_ds.rename({n: f"gap_{n}" for n in gap_ds.data_vars}).rename(configuration="gap_configuration"))
    out.attrs.update(attrs)
    return out


def table_dataset(table: pd.DataFrame, prefix: str) -> xr.Dataset:
    """A table indexed by configuration as a netCDF-safe dataset (bools as ints, prefixed names)."""
    frame = table.copy()
    frame.index = frame.index.astype(str)
    frame = frame.astype({c: int for c in frame.columns if frame[c].dtype == bool})
    return xr.Dataset.from_dataframe(frame).rename({c: f"{prefix}_{c}" for c in frame.columns})
