"""Paper A's §5: a target task trained with random sets of auxiliary tasks; its mean gradient conflict (Eq. 6) over
training against each trajectory factor (Figure 5) and against its generalization (Figure 6).

- `draw_aux_sets`: the random auxiliary sets, a pure function of (seed, target, size, pool): distinct sets of each
  size, never holding the target.
- `run_summary`: one row per run of the target: its set, mean conflict over the trained checkpoints, generalization
  and the factors' one-number summaries (Appendix B.4, as in §4.1's Table 1).
- `correlation_table`: Pearson and Spearman coefficients of the conflict against each quantity, with p-values.
- `finding`: what the table says against the paper's answer (conflict predicts the factors, not generalization).
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore._seeding import numpy_rng
from mtlcore.analysis import comparisons, trajectories

CONFLICT = "conflict"  # the per-run mean of the run variable `conflict` (the cosine of Eq. 6: lower, more conflict)
# The quantities set against the conflict: the factors of Figure 5 (summaries as in Table 1) and generalization
# (Figure 6). Each name is a column of `run_summary`.
FACTOR_QUANTITIES = ("fisher_trace", "sharpness", "grad_cov_trace", "min_train_loss")
SCORE_QUANTITY = "generalization"
AT_LOSS = "_at_loss"  # the suffix of a factor read at comparable training loss (Appendix B.4)
# At most this many combinations are enumerated to draw from; beyond it, sets are drawn and repeats redrawn.
_ENUMERATE_UP_TO = 20_000


@dataclass(frozen=True)
class AuxSet:
    target: str
    size: int
    draw: int  # 0, 1, ... within (target, size)
    tasks: tuple[str, ...]  # the auxiliary tasks, in the pool's order

    @property
    def run_tasks(self) -> list[str]:
        """The run's tasks: the target first, then its auxiliary set."""
        return [self.target, *self.tasks]


def draw_aux_sets(target: str, pool: Sequence[str], sizes: Sequence[int], sets_per_size: int,
                  seed: int = 0) -> list[AuxSet]:
    """`sets_per_size` distinct auxiliary sets of each size in `sizes`, drawn uniformly from `pool` without the target.

    Deterministic: the sets of one size depend only on (seed, target, size, the pool without the target), so adding
    a size or a draw never changes the others. A size the pool cannot fill, or more sets than there are of a size,
    raise ValueError naming the valid range.
    """
    pool = list(pool)
    if len(set(pool)) != len(pool):
        raise ValueError(f"the pool repeats a task: {pool}")
    candidates = [t for t in pool if t != target]
    if not candidates:
        raise ValueError(f"the pool {pool} holds no task besides the target {target!r}")
    if isinstance(sets_per_size, bool) or not isinstance(sets_per_size, int) or sets_per_size < 1:
        raise ValueError(f"sets_per_size={sets_per_size!r} must be a positive integer")
    if len(set(sizes)) != len(list(sizes)) or not list(sizes):
        raise ValueError(f"sizes={list(sizes)} must be distinct set sizes, at least one")
    out = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= len(candidates):
            raise ValueError(f"set size {size!r} is not valid for target {target!r}: the pool holds "
                             f"{len(candidates)} other tasks, so sizes run from 1 to {len(candidates)}")
        available = math.comb(len(candidates), int(size))
        if sets_per_size > available:
            raise ValueError(f"target {target!r}: {sets_per_size} distinct sets of size {size} were asked for, but "
                             f"the {len(candidates)} other tasks form only {available}; ask for at most {available}")
        rng = numpy_rng(seed, "aux-sets", target, int(size), *candidates)
        if available <= _ENUMERATE_UP_TO:
            every = list(itertools.combinations(range(len(candidates)), int(size)))
            chosen = [every[i] for i in rng.choice(available, size=sets_per_size, replace=False)]
        else:
            chosen, seen = [], set()
            while len(chosen) < sets_per_size:
                draw = tuple(sorted(rng.choice(len(candidates), size=int(size), replace=False).tolist()))
                if draw not in seen:
                    seen.add(draw)
                    chosen.append(draw)
        out += [AuxSet(target, int(size), i, tuple(candidates[j] for j in indices)) for i, indices in enumerate(chosen)]
    return out


def run_summary(runs: xr.Dataset, target: str, sets: Sequence[AuxSet] = (),
                loss_bins: Mapping | None = None) -> pd.DataFrame:
    """One row per run of `runs` (combined along `run`): the target's auxiliary tasks and their number (0: alone),
    the draw of `sets` it came from (−1 when none matches), its mean conflict over the trained checkpoints where it
    was measured (NaN alone: there is no multi-task update), generalization and the factor summaries of
    `comparisons.trajectory_summaries` (epoch windows). With `loss_bins` (keywords of
    `comparisons.binned_summaries`), also each factor at comparable training loss over all the runs, as
    `<factor>_at_loss`. Runs that did not complete have NaN values (left out of correlations)."""
    chosen = runs.sel(task=target)
    summaries = comparisons.trajectory_summaries(chosen)
    if loss_bins is not None:
        binned, _ = comparisons.binned_summaries(chosen, **loss_bins)
        summaries = summaries.merge(binned.rename({name: f"{name}{AT_LOSS}" for name in binned.data_vars}))
    trained = chosen["conflict"].sel(epoch=chosen["epoch"] > 0)
    conflict = trained.mean("epoch", skipna=True) if int(trained.notnull().sum()) else trained.isel(epoch=0) * np.nan
    if "status" in chosen.coords:
        conflict = conflict.where(chosen["status"] == "complete")
    draws = {(s.target, frozenset(s.tasks)): s for s in sets}
    rows = []
    for i, tasks in enumerate(runs["tasks"].values):
        aux = [t for t in (json.loads(tasks) if isinstance(tasks, str) else list(tasks)) if t != target]
        match = draws.get((target, frozenset(aux)))
        row = {"run": str(runs["run"].values[i]), "target": target, "aux_tasks": ", ".join(aux), "size": len(aux),
               "draw": match.draw if match else -1, "seed": int(runs["seed"].values[i]) if "seed" in runs.coords else -1,
               CONFLICT: float(conflict.values[i])}
        for name in (SCORE_QUANTITY, *FACTOR_QUANTITIES, *(f"{f}{AT_LOSS}" for f in comparisons.BINNED_FACTORS)):
            row[name] = float(summaries[name].values[i]) if name in summaries else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def correlation_table(summary: pd.DataFrame, quantities: Sequence[str], *, x: str = CONFLICT,
                      by: str | None = "target") -> pd.DataFrame:
    """Pearson r and Spearman ρ (with two-sided p-values and the number of pairs) of column `x` against each of
    `quantities`, per value of column `by` (None: all rows together), over the rows where both are finite.
    Rows (by value, quantity); NaN coefficients with fewer than 3 pairs or a constant side."""
    missing = [c for c in (x, *quantities, *([by] if by else [])) if c not in summary.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the summary; columns: {list(summary.columns)}")
    groups = summary.groupby(by, sort=False) if by else [("all", summary)]
    rows = []
    for key, group in groups:
        for quantity in quantities:
            c = trajectories.correlations(group[x].to_numpy(float), group[quantity].to_numpy(float))
            rows.append({by or "group": key, "quantity": quantity, "pearson_r": c.pearson, "pearson_p": c.pearson_p,
                         "spearman_rho": c.spearman, "spearman_p": c.spearman_p, "n": c.n})
    return pd.DataFrame(rows).set_index([by or "group", "quantity"])


@dataclass(frozen=True)
class ConflictFinding:
    factors_follow_conflict: list[str]  # factors that grow with the conflict: ρ < 0 with the similarity, p < alpha
    factors_opposite: list[str]  # factors that shrink with it: ρ > 0 with the similarity, p < alpha
    generalization_follows: list[str]  # groups whose generalization correlates significantly with it
    agrees_with_paper: bool
    text: str


def finding(table: pd.DataFrame, factors: Sequence[str], *, alpha: float = 0.05, context: str = "") -> ConflictFinding:
    """Read `correlation_table` against the paper's §5 answer: more conflict (lower similarity) goes with larger
    factors (Figure 5: a negative correlation with the similarity), while generalization does not follow it (Figure 6).

    A factor grows with the conflict when, in every group, its Spearman ρ with the similarity is negative with
    p < alpha (shrinks: positive with p < alpha); generalization follows the conflict in a group when its Spearman
    p < alpha (either sign). The paper's answer holds when some factor grows with the conflict and generalization
    follows it in no group."""
    groups = list(dict.fromkeys(table.index.get_level_values(0)))

    def everywhere(factor, sign):
        return all((g, factor) in table.index and np.sign(table.loc[(g, factor), "spearman_rho"]) == sign
                   and table.loc[(g, factor), "spearman_p"] < alpha for g in groups)

    follow = [f for f in factors if everywhere(f, -1)]
    opposite = [f for f in factors if everywhere(f, 1)]
    general = [g for g in groups if (g, SCORE_QUANTITY) in table.index
               and table.loc[(g, SCORE_QUANTITY), "spearman_p"] < alpha]
    agrees = bool(follow) and not general
    text = (f"**{'Agrees' if agrees else 'Does not agree'} with the paper**{' ' + context if context else ''}. "
            f"Factors that grow with the conflict (Spearman ρ < 0 with the cosine, p < {alpha}, for every target): "
            f"{', '.join(follow) or 'none'}. Factors that shrink with it (ρ > 0, p < {alpha}): "
            f"{', '.join(opposite) or 'none'}. Generalization correlated with the conflict (p < {alpha}): "
            f"{'for ' + ', '.join(map(str, general)) if general else 'for no target'}.")
    return ConflictFinding(follow, opposite, general, agrees, text)


def shown_table(table: pd.DataFrame, names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """`correlation_table` as the chapter prints it: r and ρ to 2 decimals with their p-values."""
    names = names or {}
    out = pd.DataFrame(index=table.index)
    out["Pearson r (p)"] = [f"{r:+.2f} ({p:.2g})" if np.isfinite(r) else "–" for r, p in
                            zip(table["pearson_r"], table["pearson_p"])]
    out["Spearman ρ (p)"] = [f"{r:+.2f} ({p:.2g})" if np.isfinite(r) else "–" for r, p in
                             zip(table["spearman_rho"], table["spearman_p"])]
    out["runs"] = table["n"].values
    return out.rename(index=lambda v: names.get(v, v))


def scatter_against_conflict(summary: pd.DataFrame, quantities: Sequence[str], table: pd.DataFrame, *,
                             labels: Mapping[str, str] | None = None, names: Mapping[str, str] | None = None,
                             reference: pd.DataFrame | None = None, title: str = ""):
    """Figures 5 and 6: each quantity (columns) of each target (rows) against the mean conflict, one point per run
    coloured by the size of its auxiliary set, Pearson r and Spearman ρ (p-values) of `table` in each panel;
    `reference`: the target's runs alone (one row per run), drawn as a dashed line at their mean."""
    import matplotlib.pyplot as plt

    labels, names = labels or {}, names or {}
    targets = list(dict.fromkeys(summary["target"]))
    sizes = sorted(summary.loc[summary["size"] > 0, "size"].unique())
    colors = dict(zip(sizes, plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(len(sizes), 1)))))
    width = max(3.9 * len(quantities), 5.5)
    fig, axes = plt.subplots(len(targets), len(quantities), figsize=(width, 3.3 * len(targets)), squeeze=False)
    for row, target in enumerate(targets):
        mine = summary[(summary["target"] == target) & (summary["size"] > 0)]
        for ax, quantity in zip(axes[row], quantities):
            for size in sizes:
                part = mine[mine["size"] == size]
                ax.scatter(part[CONFLICT], part[quantity], color=colors[size], s=28, label=f"{size} auxiliary")
            if reference is not None:
                alone = reference.loc[reference["target"] == target, quantity].to_numpy(float)
                if np.isfinite(alone).any():
                    ax.axhline(np.nanmean(alone), color="tab:blue", ls="--", lw=1, label="alone (STL)")
            if quantity in ("fisher_trace", "grad_cov_trace") and (mine[quantity] > 0).all():
                ax.set_yscale("log")
            if (target, quantity) in table.index:
                c = table.loc[(target, quantity)]
                ax.set_title(f"r={c['pearson_r']:+.2f} (p={c['pearson_p']:.2g}), ρ={c['spearman_rho']:+.2f} "
                             f"(p={c['spearman_p']:.2g})", fontsize="small")
            ax.set_xlabel("mean cos(g_target, d)  (← more conflict)")
            ax.set_ylabel(f"{names.get(target, target)}: {labels.get(quantity, quantity.replace('_', ' '))}")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
    return fig
