"""Figure functions the notebooks call. Each returns its matplotlib Figure."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: notebooks capture the figure; scripts save it
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

PALETTE = {"STL": "tab:blue"}
CYCLE = ["tab:green", "tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def colors_for(labels: Sequence[str]) -> dict[str, str]:
    others = iter(CYCLE)
    return {label: PALETTE.get(label) or next(others) for label in labels}


def seed_band(loss: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch over seeds (rows): geometric-mean loss, mean score and the score's std (ddof=1 if >1 seed)."""
    ddof = 1 if score.shape[0] > 1 else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.exp(np.nanmean(np.log(loss), axis=0))
        y = np.nanmean(score, axis=0)
        s = np.nanstd(score, axis=0, ddof=ddof)
    return x, y, s


def generalization_vs_loss(runs: xr.Dataset, *, group: str, order: Sequence[str] | None = None,
                           loss: str = "train_loss", score: str = "test_score", title: str = "",
                           ax: plt.Axes | None = None) -> plt.Figure:
    """The paper's Figure 1: `score` against `loss` (log axis), one curve per `group` value, mean ± 2 std."""
    labels = list(order) if order is not None else sorted(set(runs[group].values))
    colors = colors_for(labels)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
    else:
        fig = ax.figure
    for label in labels:
        sel = runs.where(runs[group] == label, drop=True)
        if sel.sizes.get("run", 0) == 0:
            continue
        x, y, s = seed_band(sel[loss].values, sel[score].values)
        ok = np.isfinite(x) & np.isfinite(y)
        n = sel.sizes["run"]
        ax.plot(x[ok], y[ok], "-o", ms=2.5, color=colors[label], label=f"{label} (n={n})")
        ax.fill_between(x[ok], (y - 2 * s)[ok], (y + 2 * s)[ok], color=colors[label], alpha=0.18, lw=0)
    ax.set_xscale("log")
    ax.invert_xaxis()  # training goes left to right
    ax.set_xlabel(f"{loss.replace('_', ' ')} (log scale, decreasing →)")
    ax.set_ylabel(score.replace("_", " "))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
