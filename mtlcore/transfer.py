"""Transfer between MTL and STL trajectories (§3): labels, generalization tables, gaps at comparable loss."""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

TASK_NAMES = {"fashion1": "Fashion1", "fashion2": "Fashion2", "noisy_fashion": "NoisyFashion", "notmnist": "NotMNIST"}


def configuration_label(tasks: str | Sequence[str], target: str) -> str:
    """'STL' for the target alone, else 'MTL: <partners>' (tasks may be the JSON string of a run attr)."""
    tasks = json.loads(tasks) if isinstance(tasks, str) else list(tasks)
    partners = [t for t in tasks if t != target]
    if not partners:
        return "STL"
    return "MTL: " + " + ".join(TASK_NAMES.get(p, p) for p in partners)


def significant(mean_a, std_a, mean_b, std_b) -> bool:
    """The ±2 std intervals of a and b do not overlap (the paper's test)."""
    return bool(abs(mean_a - mean_b) > 2 * (std_a + std_b))


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def transfer_table(summary: xr.DataArray, labels: xr.DataArray, reference: str = "STL") -> pd.DataFrame:
    """Per configuration: seeds, mean, std of `summary` (one value per run), Δ to `reference`, significance."""
    frame = pd.DataFrame({"value": summary.values, "configuration": labels.values})
    if reference not in set(frame["configuration"]):
        raise ValueError(f"no run labelled {reference!r}; labels: {sorted(set(frame['configuration']))}")
    ref_mean, ref_std = _mean_std(frame.loc[frame["configuration"] == reference, "value"].to_numpy())
    rows = []
    for label, part in frame.groupby("configuration", sort=False):
        mean, std = _mean_std(part["value"].to_numpy())
        rows.append({"configuration": label, "seeds": len(part), "mean": mean, "std": std, "delta": mean - ref_mean,
                     "significant": label != reference and significant(mean, std, ref_mean, ref_std)})
    table = pd.DataFrame(rows).set_index("configuration")
    return table.loc[[reference] + [i for i in table.index if i != reference]]


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
                 n_levels: int = 6) -> pd.DataFrame:
    """Score gaps to `reference` at common training-loss levels, with the ±2 std significance test."""
    levels = common_loss_levels(loss.values, n_levels)
    ref = (labels == reference).values
    final_ref = float(np.exp(np.nanmean(np.log([l[np.isfinite(l)][-1] for l in loss.values[ref]]))))
    rows = []
    for level in levels:
        at = np.array([value_at_loss(l, s, level) for l, s in zip(loss.values, score.values)])
        ref_mean, ref_std = _mean_std(at[ref])
        for label in dict.fromkeys(labels.values):
            if label == reference:
                continue
            mean, std = _mean_std(at[(labels == label).values])
            rows.append({"loss_level": level, "x_final": level / final_ref, "configuration": label,
                         "reference": ref_mean, "mean": mean, "delta": mean - ref_mean,
                         "significant": significant(mean, std, ref_mean, ref_std)})
    return pd.DataFrame(rows)


def generalization(val_score: xr.DataArray, test_score: xr.DataArray, k: int = 10) -> xr.DataArray:
    """One number per run: mean test score at its `k` best-validation checkpoints (REFERENCE §1.4)."""
    from mtlcore.analysis import best_validation_mean

    values = [best_validation_mean(v, t, k=k) for v, t in zip(val_score.values, test_score.values)]
    return xr.DataArray(np.asarray(values, dtype=float), dims=["run"], coords={"run": val_score["run"].values},
                        name="generalization")


def analysis_dataset(summary: xr.DataArray, labels: xr.DataArray, table: pd.DataFrame, gaps: pd.DataFrame,
                     attrs: dict) -> xr.Dataset:
    """The §3 analysis as one dataset: per-run generalization, the transfer table, the gaps at loss levels."""
    per_run = xr.Dataset({"generalization": summary}).assign_coords(run_configuration=("run", [str(v) for v in labels.values]))
    tab = table.reset_index().astype({"configuration": str, "significant": int})
    tab = xr.Dataset.from_dataframe(tab.set_index("configuration")).rename(
        {name: f"transfer_{name}" for name in ("seeds", "mean", "std", "delta", "significant")})
    out = xr.merge([per_run, tab], compat="override")
    if len(gaps):
        gap = gaps.astype({"configuration": str, "significant": int}).copy()
        gap["level"] = gap.groupby("configuration").cumcount()
        gap_ds = xr.Dataset.from_dataframe(gap.set_index(["configuration", "level"])[["loss_level", "x_final", "mean", "delta", "significant"]])
        out = out.merge(gap_ds.rename({n: f"gap_{n}" for n in gap_ds.data_vars}).rename(configuration="gap_configuration"))
    out.attrs.update(attrs)
    return out
