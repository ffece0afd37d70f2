"""Comparing configurations of one setting (the paper's §3 and §4): MTL against STL, SMTOs against the
uniform multi-task gradient.

Built on `mtlcore.analysis.trajectories` (one number per trajectory, Δ with ±2 std significance, %Δ);
this module knows the run datasets: their `run`/`task`/`epoch` dims, the attrs that label a configuration,
and the `higher_is_better` coordinate along `task` that gives each task's primary score its direction
(absent: higher is better).

Direction: every Δ and %Δ of a score (generalization, the score at a training-loss level) is oriented so
that a positive value means better, i.e. MTL − STL for a higher-is-better score (a rate of correct answers) and STL − MTL
for a lower-is-better one (an error): "positive transfer" reads the same in every table and verdict.
Means and standard deviations stay in the score's own units. The trajectory factors are lower-is-better
by definition (§4) and their Δ stays MTL − STL, as in the paper's Table 1.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore.analysis import trajectories

HIGHER_IS_BETTER = "higher_is_better"  # the run datasets' coordinate along `task`: 1 or 0

# Summary name -> (run variable, summary along epochs): the paper's one number per trajectory (Appendix B.4):
# sharpness and coherence near convergence, the Fisher trace at its early explosion, the minimum training loss.
FACTOR_SUMMARIES = {
    "sharpness": ("sharpness", "last"),
    "fisher_trace": ("fisher_trace", "top"),
    "grad_cov_trace": ("grad_cov_trace", "last"),
    "min_train_loss": ("train_loss", "min"),
}
# Factor (as named in a run's `metrics.factors`) -> the per-task variable that stands for it in Figure 3 and
# Table 1 (§4.1), chosen among the variables the factor fills (`mtlcore.metrics.schedule.VARIABLES`):
# gradient coherence is compared through the trace of the gradient covariance (Eq. 4). Gradient conflict
# (Eq. 6) needs a partner task, so an STL run has none to compare with: it has no Table 1 column.
TABLE1_VARIABLES = {"sharpness": "sharpness", "fisher_trace": "fisher_trace", "coherence": "grad_cov_trace"}
# The summaries that are scores of the task (oriented by its direction); the others are factors.
SCORE_SUMMARIES = ("generalization",)
GAP_COLUMNS = ["loss_level", "x_final", "configuration", "reference", "mean", "delta", "significant"]


def table1_variables(factors: Sequence[str]) -> list[str]:
    """The run variables compared in Figure 3 and Table 1 for the measured `factors`, in their order.

    Factors without a per-task STL counterpart (conflict) are left out; an unknown factor raises.
    """
    from mtlcore.metrics.schedule import VARIABLES

    unknown = [f for f in factors if f not in VARIABLES]
    if unknown:
        raise ValueError(f"unknown factor(s) {unknown}; valid factors: {list(VARIABLES)}")
    return [TABLE1_VARIABLES[f] for f in factors if f in TABLE1_VARIABLES]


# --- configurations ------------------------------------------------------------------------------------


def configuration_label(tasks: str | Sequence[str], target: str, display_names: Mapping[str, str] | None = None) -> str:
    """'STL' for the target alone, else 'MTL: <partners>' (tasks may be the JSON string of a run attr).

    display_names: task name -> the name shown (default: the task name itself).
    """
    tasks = json.loads(tasks) if isinstance(tasks, str) else list(tasks)
    partners = [t for t in tasks if t != target]
    if not partners:
        return "STL"
    names = display_names or {}
    return "MTL: " + " + ".join(names.get(p, p) for p in partners)


def label_configurations(runs: xr.Dataset, target: str, display_names: Mapping[str, str] | None = None) -> xr.Dataset:
    """Add the `configuration` coordinate along `run` ('STL', 'MTL: <partners>')."""
    labels = [configuration_label(t, target, display_names) for t in runs["tasks"].values]
    return runs.assign_coords(configuration=("run", labels))


# --- direction of a score --------------------------------------------------------------------------------


def score_direction(values: xr.DataArray | xr.Dataset) -> xr.DataArray | bool:
    """Whether higher is better, from the `higher_is_better` coordinate (one value per task, as booleans);
    True when the coordinate is absent."""
    if HIGHER_IS_BETTER not in values.coords:
        return True
    coordinate = values.coords[HIGHER_IS_BETTER]
    return xr.DataArray(np.asarray(coordinate.values).astype(bool), dims=coordinate.dims,
                        coords={d: values.coords[d] for d in coordinate.dims if d in values.coords})


def orientation(values: xr.DataArray | xr.Dataset, what: str = "values") -> float:
    """+1 when higher is better for every task in `values`, −1 when lower is; mixed directions raise."""
    direction = score_direction(values)
    if direction is True:
        return 1.0
    found = set(np.unique(np.asarray(direction.values, dtype=bool)).tolist())
    if len(found) > 1:
        raise ValueError(f"{what} mix higher- and lower-is-better tasks; compare one task at a time "
                         f"(e.g. .sel(task=...)) or tasks of one direction")
    return 1.0 if found.pop() else -1.0


# --- one number per trajectory ----------------------------------------------------------------------------


def _trained(values):
    """Leave out epoch 0, the untrained model: the same for every configuration of a seed."""
    return values.sel(epoch=values["epoch"] > 0) if "epoch" in values.coords else values.isel(epoch=slice(1, None))


def _completed(summary, runs):
    """NaN for runs that did not complete (diverged), so that `delta` leaves them out."""
    return summary.where(runs["status"] == "complete") if "status" in runs.coords else summary


def generalization(val_score: xr.DataArray, test_score: xr.DataArray, k: int = 10) -> xr.DataArray:
    """One number per trajectory (Appendix B.4): mean test score at its `k` best-validation trained
    checkpoints, "best" following the task's `higher_is_better` coordinate (NaN for a run that did not
    complete). The result keeps that coordinate, so that the Δ tables can orient it."""
    direction = score_direction(val_score)
    summary = trajectories.best_validation_mean(_trained(val_score), _trained(test_score), k=k, higher_is_better=direction)
    summary = _completed(summary, val_score).rename("generalization")
    if HIGHER_IS_BETTER in val_score.coords:
        summary = summary.assign_coords({HIGHER_IS_BETTER: val_score.coords[HIGHER_IS_BETTER]})
    return summary


def trajectory_summaries(runs: xr.Dataset, k_best: int = 10, k_last: int = 20, k_top: int = 20) -> xr.Dataset:
    """Generalization and each measured factor reduced to one number per trajectory (run, task).

    Only trained checkpoints count (epoch 0 is left out). `k_last` and `k_top` are in epochs, as the
    paper's "last 20 checkpoints" of a factor measured every epoch (Appendix B.4): a factor measured every
    n-th epoch averages its ceil(k / n) last or largest values, so that the window covers the same part of
    training. Runs that did not complete (diverged) get NaN, which `delta` leaves out.
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
            out[name] = trajectories.last_mean(values, k=k)
        elif how == "top":
            out[name] = trajectories.top_mean(values, k=k)
        else:
            out[name] = values.min("epoch", skipna=True)
    return _completed(xr.Dataset(out), runs)


# Appendix B.4's comparison at similar training loss: factor -> how its band of loss is chosen.
BINNED_FACTORS = {"fisher_trace": "early", "sharpness": "end", "grad_cov_trace": "end"}


def binned_summaries(runs: xr.Dataset, n_bins: int = 20, *, skip_highest: int = 2, early_width: int = 4,
                     end_width: int = 3) -> tuple[xr.Dataset, dict[str, tuple[float, float]]]:
    """One number per trajectory read at comparable training loss (Appendix B.4), for the runs of one task: the
    Fisher trace averaged over the early-phase band (`trajectories.early_phase_band` of `n_bins` geometric bins over
    every trajectory's losses together), sharpness and the gradient covariance over the end-of-training band set by
    the trajectory with the highest minimum loss (`trajectories.end_of_training_band`). Unlike the epoch windows of
    `trajectory_summaries`, every trajectory is measured at the same losses; a run with no measured checkpoint in a
    band gets NaN. Returns the summaries (dim `run`) and each factor's band (low, high)."""
    loss = runs["train_loss"].transpose("run", "epoch")
    complete = (runs["status"] == "complete").values if "status" in runs.coords else np.ones(runs.sizes["run"], bool)
    finite = loss.where(np.isfinite(loss) & (loss > 0))
    kept = finite.isel(run=np.flatnonzero(complete))
    bands = {"early": trajectories.early_phase_band(kept.values, n_bins, skip_highest, early_width),
             "end": trajectories.end_of_training_band(kept, n_bins, end_width)}
    out, used = {}, {}
    for name, which in BINNED_FACTORS.items():
        if name in runs and bool(runs[name].notnull().any()):
            out[name] = trajectories.band_mean(finite, runs[name].transpose("run", "epoch"), bands[which])
            used[name] = bands[which]
    return _completed(xr.Dataset(out), runs), used


# --- Δ tables ---------------------------------------------------------------------------------------------


def delta_table(values: xr.DataArray | xr.Dataset, labels: xr.DataArray, reference: str = "STL", *,
                scores: Sequence[str] = SCORE_SUMMARIES) -> pd.DataFrame:
    """Per configuration and quantity: the seed mean and std, Δ to `reference` and its ±2 std significance
    (the paper's Table 1).

    `values` holds one number per run (a DataArray, or a Dataset of several quantities). The quantities
    named in `scores` are oriented by their `higher_is_better` coordinate (a positive Δ is better); the
    others keep Δ = mean − mean of `reference`. Columns: `<q>`, `<q>_std`, `delta_<q>`, `significant_<q>`,
    and `seeds` (runs with a value).
    """
    data = values if isinstance(values, xr.Dataset) else values.to_dataset(name=values.name or "value")
    labels = np.asarray(labels.values)
    if reference not in set(labels):
        raise ValueError(f"no run labelled {reference!r}; labels: {sorted(set(labels))}")
    counted = np.zeros(len(labels), dtype=bool)  # runs with a value in some quantity (not diverged)
    for variable in data.data_vars.values():
        counted |= np.isfinite(np.asarray(variable.values, dtype=float)).reshape(len(labels), -1).any(axis=1)
    signs = {name: orientation(data[name], f"the values of {name!r}") if name in scores else 1.0 for name in data.data_vars}
    rows = []
    for label in dict.fromkeys(labels):
        row = {"configuration": label, "seeds": int((counted & (labels == label)).sum())}
        for name, variable in data.data_vars.items():
            d = trajectories.delta(variable.values[labels == label], variable.values[labels == reference])
            row.update({f"{name}": d.mtl_mean, f"{name}_std": d.mtl_std, f"delta_{name}": signs[name] * d.delta,
                        f"significant_{name}": label != reference and d.significant})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("configuration")
    return table.loc[[reference] + [i for i in table.index if i != reference]]


def transfer_table(summary: xr.DataArray, labels: xr.DataArray, reference: str = "STL") -> pd.DataFrame:
    """§3's table of one score summary per run: `mean`, `std`, the transfer `delta` to `reference`
    (positive: better) and `significant` (±2 std)."""
    table = delta_table(summary.to_dataset(name="value"), labels, reference, scores=("value",))
    return table.rename(columns={"value": "mean", "value_std": "std", "delta_value": "delta",
                                 "significant_value": "significant"})


def gaps_at_loss(loss: xr.DataArray, score: xr.DataArray, labels: xr.DataArray, reference: str = "STL",
                 n_levels: int = 6, skip_first: int = 1, *, higher_is_better: bool | None = None) -> pd.DataFrame:
    """Score gaps to `reference` at common training-loss levels, with the ±2 std significance test (§3,
    Figure 1: a generalization gap is a difference at comparable training loss).

    Each trajectory's score is read at `n_levels` geometric loss levels that every trajectory passes
    through (`trajectories.value_at_loss`). The first `skip_first` checkpoints are left out (Appendix B.4
    skips the very first, abnormally high-loss points): between the untrained model and epoch 1 the score
    jumps from chance, and a level read there by interpolation compares a straight line with a real
    checkpoint. `delta` is oriented (positive: better) by `higher_is_better`, by default the score's
    coordinate. `x_final`: the level over the reference runs' final training loss (geometric mean).
    """
    sign = orientation(score, "the scores") if higher_is_better is None else (1.0 if higher_is_better else -1.0)
    loss, score = (a.transpose("run", "epoch").isel(epoch=slice(skip_first, None)) for a in (loss, score))
    levels = trajectories.common_loss_levels(loss.values, n_levels)
    labels = np.asarray(labels.values)
    if reference not in set(labels):
        raise ValueError(f"no run labelled {reference!r}; labels: {sorted(set(labels))}")
    finals = [l[np.isfinite(l) & (l > 0)][-1] for l in loss.values[labels == reference] if (np.isfinite(l) & (l > 0)).any()]
    final_reference = float(np.exp(np.mean(np.log(finals)))) if finals else float("nan")
    rows = []
    for level in levels:
        at = np.array([trajectories.value_at_loss(l, s, level) for l, s in zip(loss.values, score.values)])
        for label in dict.fromkeys(labels):
            if label == reference:
                continue
            d = trajectories.delta(at[labels == label], at[labels == reference])
            rows.append({"loss_level": level, "x_final": level / final_reference, "configuration": label,
                         "reference": d.stl_mean, "mean": d.mtl_mean, "delta": sign * d.delta,
                         "significant": d.significant})
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def smto_changes(summaries: xr.Dataset, aggregator: xr.DataArray, group: xr.DataArray,
                 reference: str = "uniform") -> pd.DataFrame:
    """§4.2, Figure 4: for every (group, task, SMTO), %Δ = 100·(SMTO − uniform)/|uniform| of each summary
    (seed means), and whether the change in generalization is significant (±2 std).

    The %Δ of generalization is oriented by the task's direction (positive: better); a factor's is not
    (lower is better).
    """
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
                sign = orientation(s["generalization"], f"the generalization of task {task!r}")
                d = trajectories.delta(s["generalization"].values[mine], s["generalization"].values[base])
                row = {"group": g, "task": str(task), "aggregator": method, "significant": d.significant,
                       "generalization": sign * float(trajectories.percent_change(d.mtl_mean, d.stl_mean))}
                for name in FACTOR_SUMMARIES:
                    row[name] = float(trajectories.percent_change(np.nanmean(s[name].values[mine]),
                                                                  np.nanmean(s[name].values[base])))
                rows.append(row)
    return pd.DataFrame(rows, columns=["group", "task", "aggregator", "significant", "generalization", *FACTOR_SUMMARIES])


# --- saving ----------------------------------------------------------------------------------------------


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


# --- tables as a reader sees them -------------------------------------------------------------------------------
def resolution(std: float) -> int:
    """Decimals that a seed-to-seed std resolves: its first two significant digits (2 for a std of 0.43, 1 for 1.7,
    0 for 12); 2 where there is no std (one seed, or none)."""
    if not np.isfinite(std) or std <= 0:
        return 2
    return int(max(0, 1 - np.floor(np.log10(std))))


def mean_std(mean: float, std: float, scale: float = 1.0) -> str:
    """"84.3 ± 0.4": `mean` and `std` times `scale` (100: a rate in points), rounded to what the std resolves."""
    if not np.isfinite(mean):
        return "—"
    digits = resolution(std * scale)
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if np.isfinite(std) else "")


def marked_delta(delta: float, significant: bool, std: float, scale: float = 1.0) -> str:
    """"+1.9 ✱": a signed Δ rounded to what the std resolves, ✱ when significant (±2 std)."""
    if not np.isfinite(delta):
        return "—"
    return f"{delta * scale:+.{resolution(std * scale)}f}" + (" ✱" if significant else "")


def readable_transfer_table(table: pd.DataFrame, score: str, scale: float = 1.0) -> pd.DataFrame:
    """§3's `transfer_table` as the book prints it: the generalization as mean ± std over seeds (in points for a
    rate, `scale` 100), the Δ to the reference with ✱ when significant, and the number of seeds."""
    unit = " (points)" if scale == 100 else ""
    reference_std = float(table["std"].iloc[0])
    out = pd.DataFrame(index=table.index)
    out[f"test {score}{unit}, mean ± std"] = [mean_std(m, s, scale) for m, s in zip(table["mean"], table["std"])]
    out[f"Δ vs {table.index[0]}{unit}"] = ["" if i == 0 else marked_delta(d, sig, max(s, reference_std), scale)
                                          for i, (d, sig, s) in enumerate(zip(table["delta"], table["significant"],
                                                                              table["std"]))]
    out["seeds"] = table["seeds"].values
    return out
