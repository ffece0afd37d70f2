"""The paper's figures (Figures 1, 3 and 4) drawn from run datasets and comparison tables. Each function
returns its matplotlib Figure; titles and labels come from the caller or from the variables' attrs."""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.ticker import FuncFormatter, MaxNLocator

# One colour per configuration in every chapter and figure; other labels take the cycle's colours in order.
PALETTE = {"STL": "tab:blue", "MTL": "tab:orange", "MTL: Fashion2": "tab:green", "MTL: NoisyFashion": "tab:red",
           "MTL: NotMNIST": "tab:purple", "uniform": "tab:gray"}
CYCLE = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:green", "tab:red", "tab:orange", "tab:purple"]


def colors_for(labels: Sequence[str]) -> dict[str, str]:
    others = itertools.cycle(CYCLE)
    return {label: PALETTE.get(label) or next(others) for label in labels}


def publish(fig: plt.Figure, label: str, caption: str, folder: str | Path, name: str) -> None:
    """Show `fig` in a notebook with its caption ("**`label`.** `caption`"), and save it as `folder/figures/<name>.svg`
    and `.png` (150 dpi) for slides and papers. Closes the figure."""
    from IPython.display import Markdown, display

    out = Path(folder) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"svg": out / f"{name}.svg", "png": out / f"{name}.png"}
    fig.savefig(paths["svg"], bbox_inches="tight")
    fig.savefig(paths["png"], dpi=150, bbox_inches="tight")
    display(fig)
    plt.close(fig)
    display(Markdown(f"**{label}.** {caption} (Saved as `figures/{name}.svg` and `.png` in the results folder.)"))


def seed_band(loss: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch over seeds (rows: run × epoch): geometric-mean loss, mean score and the score's sample std.

    Non-finite values (a diverged seed's NaN, or the inf loss it stopped at) leave that seed out of that epoch;
    an epoch with fewer than two finite seeds (a lone seed) gets a NaN band, without a warning.
    """
    loss = np.where(np.isfinite(loss) & (loss > 0), loss, np.nan)
    score = np.where(np.isfinite(score), score, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = np.exp(np.nanmean(np.log(loss), axis=0))
        y = np.nanmean(score, axis=0)
        s = np.nanstd(score, axis=0, ddof=1)
    return x, y, s


def _seed_count(runs: xr.Dataset) -> str:
    """"n=3", or "n=2 of 3" when some runs did not complete (diverged: drawn up to where they stopped)."""
    n = runs.sizes["run"]
    if "status" not in runs.coords:
        return f"n={n}"
    complete = int((runs["status"] == "complete").sum())
    return f"n={n}" if complete == n else f"n={complete} of {n}"


def variable_label(values: xr.DataArray) -> str:
    """A variable's axis label: its `long_name` attr (xarray's convention), else its name without underscores."""
    return str(values.attrs.get("long_name") or (values.name or "").replace("_", " "))


def _zoom(ax: plt.Axes, xs: np.ndarray, ys: np.ndarray, yscale: str) -> None:
    """Limit `ax` to the finite points (xs, ys), with a margin; log axes keep only positive values."""
    xs = xs[np.isfinite(xs) & (xs > 0)]  # the x axis (loss) is always logarithmic
    ys = ys[np.isfinite(ys) & ((ys > 0) if yscale == "log" else True)]
    if ys.size:
        if yscale == "log":
            ax.set_ylim(ys.min() / 1.1, ys.max() * 1.1)
        else:
            pad = 0.05 * (ys.max() - ys.min()) or 0.01 * abs(ys.max()) or 0.01
            ax.set_ylim(ys.min() - pad, ys.max() + pad)
    if xs.size:
        ax.set_xlim(xs.min() / 1.05, xs.max() * 1.05)


def _label_log_ticks(axis) -> None:
    """Plain numbers (0.2, 1, 5) on a log axis: powers of ten, 2 and 5 between them, and every tick when the
    view spans less than a decade (a zoom). matplotlib's 2×10⁻¹-style minor labels overlapped on narrow panels."""
    def label(value: float, _position) -> str:
        low, high = sorted(axis.get_view_interval())
        mantissa = round(value / 10 ** np.floor(np.log10(value)), 6) if value > 0 else 0.0
        shown = mantissa in (1.0, 2.0, 5.0) or (low > 0 and np.log10(high / low) < 1)
        return f"{value:g}" if shown else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def generalization_vs_loss(runs: xr.Dataset, *, group: str, order: Sequence[str] | None = None,
                           loss: str = "train_loss", score: str = "test_score", title: str = "",
                           ax: plt.Axes | None = None, yscale: str = "linear", legend: bool = True,
                           zoom_last: float | None = None, ylabel: str | None = None) -> plt.Figure:
    """The paper's Figures 1 and 3: `score` (a score or a factor) against `loss` (log axis), one curve
    per `group` value, mean ± 2 std over the runs of the group; unmeasured epochs are skipped.

    zoom_last: limit the axes to the bands of the last `zoom_last` fraction of the epochs (e.g. 0.5), where
    the curves of a whole-trajectory plot sit on top of each other. ylabel: the y axis label (default:
    `variable_label` of `score`).
    Runs that did not complete are drawn up to where they stopped; the legend's n counts the complete ones.
    """
    labels = list(order) if order is not None else sorted(set(runs[group].values))
    colors = colors_for(labels)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
    else:
        fig = ax.figure
    late_x, late_y = [], []
    for label in labels:
        sel = runs.where(runs[group] == label, drop=True)
        if sel.sizes.get("run", 0) == 0:
            continue
        # transpose: a dataset ordered (epoch, run) must not be averaged over epochs; an extra dimension raises
        x, y, s = seed_band(sel[loss].transpose("run", "epoch").values, sel[score].transpose("run", "epoch").values)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.plot(x[ok], y[ok], "-o", ms=2.5, color=colors[label], label=f"{label} ({_seed_count(sel)})")
        ax.fill_between(x[ok], (y - 2 * s)[ok], (y + 2 * s)[ok], color=colors[label], alpha=0.18, lw=0)
        if zoom_last is not None:
            late = ok & (np.arange(len(x)) >= round(len(x) * (1 - zoom_last)))
            late_x.append(x[late])
            late_y += [y[late], (y - 2 * s)[late], (y + 2 * s)[late]]  # the band is NaN for a lone seed
    if late_x:
        _zoom(ax, np.concatenate(late_x), np.concatenate(late_y), yscale)
    ax.set_xscale("log")
    _label_log_ticks(ax.xaxis)
    ax.set_yscale(yscale)
    if not ax.xaxis_inverted():
        ax.invert_xaxis()  # training goes left to right
    ax.set_xlabel(f"{loss.replace('_', ' ')} (log scale, decreasing →)")
    ax.set_ylabel(ylabel or variable_label(runs[score]))
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def factors_vs_loss(runs: xr.Dataset, factors: Sequence[str], *, group: str, order: Sequence[str] | None = None,
                    title: str = "") -> plt.Figure:
    """The paper's Figure 3: each factor against the training loss, one panel per factor."""
    fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 3.8), squeeze=False)
    for i, (ax, factor) in enumerate(zip(axes[0], factors)):
        generalization_vs_loss(runs, group=group, order=order, score=factor, ax=ax, legend=(i == 0),
                               yscale="log" if factor in ("fisher_trace", "grad_cov_trace", "grad_norm_sq") else "linear")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


QUADRANT_MARKERS = {"mgda": "o", "pcgrad": "s", "gradnorm": "^"}
QUADRANT_COLORS = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def quadrant_plot(changes, factors: Sequence[str], title: str = "") -> plt.Figure:
    """The paper's Figure 4: %Δ factor (x) against %Δ generalization (y) of SMTOs over the uniform
    gradient, one panel per factor. %Δ generalization is oriented (positive: better, as
    `comparisons.smto_changes` gives it) and for every factor lower is better, so the agreeing quadrants
    (better optimisation and better generalization; worse and worse) are top-left and bottom-right.
    Marker: the SMTO; colour: the task, and with several groups (task pairs) in `changes` the (group, task).
    Filled markers: the change in generalization is significant (±2 std)."""
    columns = min(2, len(factors))  # a grid two panels wide: legible at a book's page width
    rows = math.ceil(len(factors) / columns)
    fig, grid_axes = plt.subplots(rows, columns, figsize=(5.6 * columns, 4.6 * rows), squeeze=False)
    for ax in grid_axes.flat[len(factors):]:
        ax.set_visible(False)
    axes = [list(grid_axes.flat[:len(factors)])]
    methods = list(dict.fromkeys(changes["aggregator"]))
    if "group" in changes and changes["group"].nunique() > 1:
        keys = [f"{t} ({g})" for g, t in zip(changes["group"], changes["task"])]
    else:
        keys = [str(t) for t in changes["task"]]
    colors = dict(zip(dict.fromkeys(keys), itertools.cycle(QUADRANT_COLORS)))  # not the shading's green or red
    for ax, factor in zip(axes[0], factors):
        x, y = changes[factor].to_numpy(dtype=float), changes["generalization"].to_numpy(dtype=float)
        finite = np.isfinite(x) & np.isfinite(y)
        span_x = max(1.0, np.nanmax(np.abs(x[finite])) * 1.15) if finite.any() else 1.0
        span_y = max(0.5, np.nanmax(np.abs(y[finite])) * 1.15) if finite.any() else 1.0
        ax.fill_between([-span_x, 0], 0, span_y, color="tab:green", alpha=0.12, lw=0)
        ax.fill_between([0, span_x], -span_y, 0, color="tab:red", alpha=0.12, lw=0)
        for key, (_, row) in zip(keys, changes.iterrows()):
            marker = QUADRANT_MARKERS.get(row["aggregator"], "D")
            color = colors[key]
            ax.scatter(row[factor], row["generalization"], marker=marker, s=42, edgecolors=color,
                       facecolors=color if row["significant"] else "none", linewidths=1.4)
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_xlim(-span_x, span_x)
        ax.set_ylim(-span_y, span_y)
        ax.set_xlabel(f"%Δ {factor.replace('_', ' ')}")
        ax.set_ylabel("%Δ generalization")
        ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], marker=QUADRANT_MARKERS.get(m, "D"), ls="", color="k", mfc="none", label=m) for m in methods]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles=handles, frameon=False, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(4, len(handles)))
    return fig


def transfer_by_task(table, labels: Sequence[str], scale: Sequence[float], *, title: str = "") -> plt.Figure:
    """Δ generalization of each target (MTL − STL, positive: better), one bar per task, with paper A's published Δ
    as a marker where it gives one.

    table: `studies.target_table` (rows in `labels` order); `scale`: per row, the factor to the unit shown (100 for a
    rate shown in points). The whisker is 2·(std_MTL + std_STL): the ±2 std intervals of the two overlap exactly when
    it reaches zero, so a bar whose whisker crosses zero is not significant (drawn pale)."""
    scale = np.asarray(scale, dtype=float)
    delta = table["delta_generalization"].to_numpy(float) * scale
    half = 2 * (table["generalization_std"].to_numpy(float) + table["stl_generalization_std"].to_numpy(float)) * scale
    significant = table["significant_generalization"].to_numpy(bool)
    y = np.arange(len(labels))[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.4))
    colors = ["tab:green" if d > 0 else "tab:red" for d in delta]
    ax.barh(y, delta, color=colors, alpha=None, edgecolor="black", linewidth=0.5)
    for bar, sig in zip(ax.patches, significant):
        bar.set_alpha(0.9 if sig else 0.3)
    ax.errorbar(delta, y, xerr=half, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    paper = table["paper_delta_points"].to_numpy(float)
    if np.isfinite(paper).any():
        ax.scatter(paper, y, marker="D", color="black", zorder=3, label="paper A, Table 1")
        ax.legend(loc="best", fontsize="small")
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(y, labels)
    unit = ("points" if (scale == 100).all() else "the score's units" if (scale == 1).all()
            else "points for rates, else the score's units")
    ax.set_xlabel(f"Δ generalization, MTL − STL ({unit}; pale: not significant)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def generalization_grid(panels: Sequence[tuple[str, xr.Dataset]], *, group: str, order: Sequence[str],
                        columns: int = 4, title: str = "") -> plt.Figure:
    """`generalization_vs_loss` for several tasks side by side (paper A's Figure 2): one panel per (title, runs of
    that task, labelled by `group`), the legend in the first."""
    rows = max(1, math.ceil(len(panels) / columns))
    width = min(columns, len(panels)) or 1
    fig, axes = plt.subplots(rows, width, figsize=(4.2 * width, 3.4 * rows), squeeze=False)
    for ax, (name, runs) in zip(axes.flat, panels):
        generalization_vs_loss(runs, group=group, order=order, ax=ax, legend=ax is axes.flat[0], title=name,
                               ylabel=f"test {runs['primary_score'].values}")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def delta_mtm_by_method(tables: Sequence[tuple], *, title: str = "") -> plt.Figure:
    """Paper B's comparison: Δ_mtm (%, positive: better than the single-task baselines) of every tuned method, one
    panel per setting, mean over seeds with ±2 std whiskers; the uniform loss in black, the fixed weights hatched.
    `tables`: (setting, `tuned.method_table`) pairs."""
    height = max(len(table) for _, table in tables) * 0.32 + 1.3
    fig, axes = plt.subplots(1, len(tables), figsize=(4.6 * len(tables), height), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables):
        table = table.sort_values("delta_mtm", na_position="first")
        y = np.arange(len(table))
        mean, std = table["delta_mtm"].to_numpy(float), np.nan_to_num(table["delta_mtm_std"].to_numpy(float))
        colors = ["black" if m == "uniform" else "tab:orange" if m.startswith("fixed") else "tab:blue"
                  for m in table.index]
        bars = ax.barh(y, mean, color=colors, alpha=0.75)
        for bar, method in zip(bars, table.index):
            if method.startswith("fixed"):
                bar.set_hatch("//")
        ax.errorbar(mean, y, xerr=2 * std, fmt="none", ecolor="gray", elinewidth=1, capsize=2)
        ax.axvline(0, color="gray", lw=0.8)
        if "uniform" in table.index:
            ax.axvline(float(table.loc["uniform", "delta_mtm"]), color="black", lw=0.8, ls="--")
        ax.set_yticks(y, list(table.index))
        ax.set_xlabel("Δ_mtm vs single-task (%; ±2 std)")
        ax.set_title(name)
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def conflict_along_training(panels: Sequence[tuple[str, xr.Dataset]], labels: Sequence[Sequence[str]], *,
                            title: str = "") -> plt.Figure:
    """Paper B's conflict measure (1/K) Σ_k cos(g_k, ḡ) along training (mean over seeds, band ±1 std), one panel per
    setting; `panels`: (setting, runs with a `label` coordinate), `labels`: the runs' labels to draw in each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, runs), chosen in zip(axes[0], panels, labels):
        others = iter([c for c in CYCLE if c != "tab:orange"])
        colors = {label: "black" if label == "uniform" else "tab:orange" if label.startswith("fixed") else next(others)
                  for label in chosen}
        for label in chosen:
            members = runs.where(runs["label"] == label, drop=True)
            if members.sizes.get("run", 0) == 0:
                continue
            values = members["conflict_to_mean"].mean("task", skipna=False).transpose("run", "epoch").values
            epochs = members["epoch"].values
            keep = np.isfinite(values).any(axis=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, std = np.nanmean(values[:, keep], axis=0), np.nanstd(values[:, keep], axis=0, ddof=1)
            ax.plot(epochs[keep], mean, marker="o", ms=3, color=colors[label],
                    label=f"{label} (n={members.sizes['run']})")
            ax.fill_between(epochs[keep], mean - std, mean + std, color=colors[label], alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("(1/K) Σ cos(g_k, ḡ)")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
