"""Paper B's study: the uniform loss against specialized multi-task optimizers (SMTOs), each tuned on validation, and
constant task weights taken from an SMTO.

For one setting (a `studies.Study`): every task alone (the single-task baselines) and all tasks together under the
uniform loss and each SMTO, each with its own learning rate and regularisation (and the method's own options) chosen
on validation by `selection.search`; the chosen configurations re-run over the study's seeds; then constant weights
from the SMTO that validates best (`fixed_weights`), tuned and re-run the same way. Every run records paper B's
conflict measure along training (the `conflict_to_mean` factor).

What a run scores: each task's scores at the epoch of its best primary validation score (early stopping per task,
the best-validation rule of `selection.select`). From those,
- Δ_mtm (paper B, after Maninis et al.): (1/N) Σ_i (1/M_i) Σ_j s_ij (M_ij − M_ij^STL) / |M_ij^STL| · 100 over the N
  tasks and the M_i scores of task i, s_ij = +1 where a higher score is better and −1 where lower is better, so that
  a positive Δ_mtm is better than the single-task baselines (the mean over seeds of the STL runs);
- the mean rank (MR) of a method over every (task, score), from the seed means, 1 = best;
- the conflict level, (1/K) Σ_k cos(g_k, ḡ) averaged over the trained epochs and seeds.

`claims` says which of paper B's claims hold in the results (significance: the ±2 std test over seeds).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from mtlcore import settings
from mtlcore.analysis.studies import StudyStatus
from mtlcore.training.config import RunConfig
from mtlcore.training.results import combine_runs, load_run
from mtlcore.training.runner import ensure_runs, grid
from mtlcore.training.selection import Selection, check_search, method_grid, search, select
from mtlcore.training.trainer import run_path

log = logging.getLogger(__name__)

STL = "STL"


# --- the study's metrics -----------------------------------------------------------------------------------------


def delta_mtm(table: pd.DataFrame) -> float:
    """Δ_mtm in percent of one method: `table` has one row per (task, score) with columns `task`, `value` (the
    method's), `baseline` (the single-task one) and `higher_is_better`; tasks weigh equally whatever their number of
    scores. A zero baseline is refused (the relative change is undefined)."""
    missing = [c for c in ("task", "value", "baseline", "higher_is_better") if c not in table.columns]
    if missing:
        raise ValueError(f"delta_mtm: the table lacks column(s) {missing}; it needs task, value, baseline, "
                         "higher_is_better")
    if table.empty:
        raise ValueError("delta_mtm: the table has no (task, score) row")
    zero = table[table["baseline"] == 0]
    if not zero.empty:
        raise ValueError(f"delta_mtm: a single-task baseline of 0 for task(s) {sorted(zero['task'])}: the relative "
                         "change is undefined")
    sign = np.where(table["higher_is_better"].astype(bool), 1.0, -1.0)
    relative = sign * (table["value"] - table["baseline"]) / table["baseline"].abs() * 100
    return float(relative.groupby(table["task"]).mean().mean())


def mean_rank(means: pd.DataFrame, higher_is_better: Mapping | pd.Series) -> pd.Series:
    """Mean rank of each row (method) over the columns (metrics): ranks 1 = best within each column in its direction
    (`higher_is_better[column]`), ties share their mean rank, a missing value ranks last."""
    unknown = [c for c in means.columns if c not in higher_is_better]
    if unknown:
        raise ValueError(f"mean_rank: no direction for metric(s) {unknown}; give higher_is_better for every column")
    ranks = {}
    for column in means.columns:
        values = means[column].to_numpy(dtype=float)
        oriented = -values if bool(higher_is_better[column]) else values
        ranks[column] = stats.rankdata(np.where(np.isfinite(oriented), oriented, np.inf))
    return pd.DataFrame(ranks, index=means.index).mean(axis=1).rename("mean rank")


def fixed_weights(task_weight: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Paper B's constant weights from an SMTO's per-epoch mean task weights (epochs × K; rows all NaN, such as
    epoch 0 before training, are skipped): each epoch's weights normalised to sum 1, an exponential moving average
    m_e = β m_(e−1) + (1 − β) p_e from m_0 = 0, and its final value renormalised to sum 1 (which undoes the start
    at 0)."""
    weights = np.asarray(task_weight, dtype=float)
    if weights.ndim != 2:
        raise ValueError(f"task_weight must be epochs × tasks, got shape {weights.shape}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta!r} must be in [0, 1) (paper B: 0.9)")
    rows = weights[~np.isnan(weights).all(axis=1)]
    if len(rows) == 0:
        raise ValueError("the run recorded no task weight (every epoch NaN): train it for at least one epoch")
    if not np.isfinite(rows).all():
        raise ValueError("some task weights are NaN or inf: the method has no weights (d = Jᵀw does not hold for "
                         "graddrop and dbmtl), take them from another SMTO")
    totals = rows.sum(axis=1)
    if (totals <= 0).any():
        raise ValueError(f"the task weights of some epoch sum to {totals.min():.3g} <= 0 and cannot be normalised")
    average = np.zeros(weights.shape[1])
    for row, total in zip(rows, totals):
        average = beta * average + (1 - beta) * row / total
    return average / average.sum()


def fixed_weights_from_run(run: xr.Dataset, beta: float = 0.9) -> list[float]:
    """`fixed_weights` of one run dataset's `task_weight`, in its task order."""
    return [float(w) for w in fixed_weights(run["task_weight"].transpose("epoch", "task").values, beta)]


# --- scores of the runs ------------------------------------------------------------------------------------------


def score_directions(setting: str, tasks: Sequence[str]) -> dict[tuple[str, str], bool]:
    """(task, score) -> whether a higher score is better, from the setting's tasks."""
    described = settings.get(setting)
    return {(t, s.name): s.higher_is_better for t in tasks for s in described.task(t).scores}


def scores_at_best_validation(runs: xr.Dataset, split: str = "test") -> pd.DataFrame:
    """One row per (run, task, score): the `split` score (`test` or `val`) at the epoch of the task's best primary
    validation score among the trained epochs (epoch 0 left out; a run that diverged is left out)."""
    if split not in ("test", "val"):
        raise ValueError(f"split={split!r}; use 'test' or 'val'")
    rows = []
    for i, run_id in enumerate(runs["run"].values):
        if str(runs["status"].values[i]) != "complete":
            continue
        tasks = json.loads(str(runs["tasks"].values[i]))
        setting = str(runs["setting"].values[i])
        directions = score_directions(setting, tasks)
        for task in tasks:
            primary = runs["val_score"].isel(run=i).sel(task=task).values[1:]
            if not np.isfinite(primary).any():
                continue
            higher = directions[(task, settings.get(setting).task(task).scores[0].name)]
            filled = np.where(np.isfinite(primary), primary, -np.inf if higher else np.inf)
            epoch = 1 + int(np.argmax(filled) if higher else np.argmin(filled))
            values = runs[f"{split}_scores"].isel(run=i).sel(task=task, epoch=epoch)
            for score in values["score"].values:
                if (task, str(score)) in directions:
                    rows.append({"run": str(run_id), "task": task, "score": str(score), "epoch": epoch,
                                 "value": float(values.sel(score=score)), "higher_is_better": directions[(task, str(score))]})
    return pd.DataFrame(rows, columns=["run", "task", "score", "epoch", "value", "higher_is_better"])


def run_deltas(scores: pd.DataFrame, labels: Mapping[str, str], stl_label: str = STL) -> pd.Series:
    """Δ_mtm of every multi-task run (`scores` from `scores_at_best_validation`; `labels`: run -> its method, the
    single-task runs labelled `stl_label`), against the mean over seeds of the single-task runs of each task."""
    scores = scores.assign(label=scores["run"].map(labels))
    stl = scores[scores["label"] == stl_label].groupby(["task", "score"])["value"].mean().rename("baseline")
    if stl.empty:
        raise ValueError(f"no single-task run (label {stl_label!r}) to compare with")
    out = {}
    for run, table in scores[scores["label"] != stl_label].groupby("run"):
        joined = table.join(stl, on=["task", "score"])
        lacking = joined[joined["baseline"].isna()]
        if not lacking.empty:
            raise ValueError(f"run {run}: no single-task baseline for {sorted(set(zip(lacking['task'], lacking['score'])))}")
        out[run] = delta_mtm(joined)
    return pd.Series(out, name="delta_mtm", dtype=float)


# --- the study ---------------------------------------------------------------------------------------------------


def _takes(name: str, num_tasks: int) -> bool:
    from mtlcore import aggregators

    try:
        aggregators.get(name).reset(num_tasks)
    except ValueError:
        return False
    return True

NOT_SMTOS = ("uniform", "fixed")


def smtos(names: str | Sequence[str], num_tasks: int | None = None) -> list[str]:
    """The SMTOs a study compares: `"all"` for every aggregator of the registry but the uniform and fixed weights
    (with `num_tasks`, those that take that many tasks: some robust aggregators need more), else the names given
    (each checked)."""
    from mtlcore import aggregators

    available = [a for a in aggregators.available() if a not in NOT_SMTOS]
    if names == "all":
        return [a for a in available if num_tasks is None or _takes(a, num_tasks)]
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"aggregators={names!r} must be 'all' or a list of SMTO names from {available}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown SMTO(s) {unknown} (uniform and fixed are always compared); valid: {available}")
    return list(names)


@dataclass(frozen=True)
class TunedStudy:
    """What `run_study` trained for one setting; `runs`: the final runs (every seed) with a `label` coordinate along
    `run`: `STL` for the single-task runs, the aggregator for the others, `fixed (<SMTO>)` for the constant weights."""

    status: StudyStatus
    stl: dict[str, Selection]  # task -> the single-task selection
    methods: dict[str, Selection]  # aggregator -> its selection (uniform and every SMTO)
    fixed: Selection | None
    fixed_from: str | None  # the SMTO whose weights the fixed runs use
    fixed_source: str | None  # the run they were derived from
    fixed_weights: tuple[float, ...] | None
    runs: xr.Dataset
    search_runs: int  # runs of the selections (a repeated configuration counted once per selection)

    @property
    def fixed_label(self) -> str | None:
        return f"fixed ({self.fixed_from})" if self.fixed_from else None


def _final(base: dict, chosen: dict, tasks: list[str], seeds: Sequence[int]) -> list[RunConfig]:
    return grid({**base, **chosen}, tasks=[tasks], seed=list(seeds))


def run_study(status: StudyStatus, aggregators: Sequence[str], spec: dict, results_dir: str | Path, *,
              metrics: dict | None = None, beta: float = 0.9, **load_kwargs) -> TunedStudy:
    """Paper B's study of one runnable setting: the single-task baselines and the uniform loss and every SMTO in
    `aggregators`, each tuned on validation by `selection.search` over `spec` (`grid`, `options`, `seeds`), re-run
    with the chosen configuration over the study's seeds; then constant weights (`fixed_weights`, EMA `beta`) from
    the SMTO of best mean validation Δ_mtm among those with weights, taken from its run on the study's first seed,
    tuned over the shared grid and re-run likewise. Every run measures `metrics` (paper B's conflict: the
    `conflict_to_mean` factor), so the search's runs on a study seed are its final runs too. Cached by content hash:
    a second call trains nothing, a killed one resumes."""
    study = status.study
    kwargs = {"data_root": status.data_root, **load_kwargs}
    base = {**study.config, "metrics": metrics or {}}
    tasks, seeds = list(study.tasks), list(study.seeds)
    stl_base = {**base, "aggregator": "uniform", "aggregator_options": {}}
    shared = {"grid": spec["grid"], "seeds": spec.get("seeds", [0])}
    stl = {t: select(stl_base, shared, [[t]], results_dir, metrics=metrics, **kwargs) for t in tasks}
    methods = search(base, ["uniform", *aggregators], spec, [tasks], results_dir, metrics=metrics, **kwargs)
    configs = {STL: [c for t in tasks for c in _final(stl_base, stl[t].chosen, [t], seeds)]}
    configs.update({m: _final(base, s.chosen, tasks, seeds) for m, s in methods.items()})
    loaded: dict[Path, xr.Dataset] = {}  # each run file read once
    runs = _labelled(configs, results_dir, loaded, **kwargs)
    fixed = fixed_from = source = weights = None
    best = best_on_validation(runs, [m for m in aggregators])
    if best is not None:
        fixed_from = best
        source_config = next(c for c in configs[best] if c.seed == seeds[0])
        source = source_config.content_hash()
        weights = tuple(fixed_weights_from_run(loaded[run_path(source_config, results_dir)], beta))
        axes = method_grid(spec["grid"], "fixed", {"weights": [list(weights)], "source": [source]})
        fixed = select(base, {"grid": axes, "seeds": shared["seeds"]}, [tasks], results_dir, metrics=metrics, **kwargs)
        configs[f"fixed ({best})"] = _final(base, fixed.chosen, tasks, seeds)
        runs = _labelled(configs, results_dir, loaded, **kwargs)
    search_runs = sum(s.runs for s in [*stl.values(), *methods.values(), *([fixed] if fixed else [])])
    return TunedStudy(status, stl, methods, fixed, fixed_from, source, weights, runs, search_runs)


def _labelled(configs: Mapping[str, list[RunConfig]], results_dir, loaded: dict, **kwargs) -> xr.Dataset:
    """The runs of `configs` (trained where missing) with their label; `loaded`: path -> dataset, files read so far."""
    everything = [c for group in configs.values() for c in group]
    missing = [c for c in everything if run_path(c, results_dir) not in loaded]
    paths = ensure_runs(missing, results_dir, **kwargs) if missing else []
    loaded.update({path: load_run(path) for path in paths if path not in loaded})
    runs = combine_runs([loaded[p] for p in dict.fromkeys(run_path(c, results_dir) for c in everything)])
    label = {c.content_hash(): name for name, group in configs.items() for c in group}
    return runs.assign_coords(label=("run", [label[str(r)] for r in runs["run"].values]))


def _labels(runs: xr.Dataset) -> dict[str, str]:
    return dict(zip(map(str, runs["run"].values), map(str, runs["label"].values)))


def best_on_validation(runs: xr.Dataset, candidates: Sequence[str]) -> str | None:
    """Among `candidates` (labels of `runs` whose every run recorded finite task weights), the one of highest mean
    validation Δ_mtm over seeds (first in order among equals); None when none qualifies."""
    deltas = run_deltas(scores_at_best_validation(runs, "val"), _labels(runs))
    labels = _labels(runs)
    best, best_value = None, -np.inf
    for candidate in candidates:
        members = [r for r, name in labels.items() if name == candidate]
        if not members:
            continue
        weights = runs["task_weight"].sel(run=members).isel(epoch=slice(1, None)).values
        if not np.isfinite(weights[~np.isnan(weights).all(axis=-1)]).all() or np.isnan(weights).all():
            continue
        value = deltas.reindex(members).mean()
        if np.isfinite(value) and value > best_value:
            best, best_value = candidate, value
    return best


def conflict_levels(runs: xr.Dataset) -> pd.Series:
    """run -> paper B's conflict measure (1/K) Σ_k cos(g_k, ḡ) averaged over the trained epochs where measured
    (NaN for single-task runs and runs without the `conflict_to_mean` factor)."""
    if "conflict_to_mean" not in runs:
        return pd.Series(np.nan, index=map(str, runs["run"].values), name="conflict")
    measured = runs["conflict_to_mean"].isel(epoch=slice(1, None)).mean("task", skipna=False)
    return pd.Series(measured.mean("epoch", skipna=True).values, index=list(map(str, runs["run"].values)),
                     name="conflict")


def method_table(result: TunedStudy) -> pd.DataFrame:
    """One row per multi-task method: the chosen configuration, Δ_mtm mean and std over seeds (in %), the number of
    seeds, the mean rank over every (task, score), the conflict level, and the diverged runs left out."""
    runs = result.runs
    labels = _labels(runs)
    scores = scores_at_best_validation(runs, "test")
    deltas = run_deltas(scores, labels)
    conflict = conflict_levels(runs)
    scores = scores.assign(label=scores["run"].map(labels), metric=scores["task"] + " " + scores["score"])
    means = scores[scores["label"] != STL].pivot_table(index="label", columns="metric", values="value", aggfunc="mean")
    directions = scores.drop_duplicates("metric").set_index("metric")["higher_is_better"]
    ranks = mean_rank(means, directions)
    chosen = {m: s.chosen for m, s in result.methods.items()}
    if result.fixed is not None:
        chosen[result.fixed_label] = result.fixed.chosen
    rows = []
    for label, config in chosen.items():
        members = [r for r, name in labels.items() if name == label]
        values = deltas.reindex(members).dropna()
        rows.append({"method": label, "configuration": describe_choice(config),
                     "delta_mtm": values.mean() if len(values) else np.nan,
                     "delta_mtm_std": values.std(ddof=1) if len(values) > 1 else np.nan, "seeds": len(values),
                     "mean_rank": ranks.get(label, np.nan), "conflict": conflict.reindex(members).mean(),
                     "diverged": int(sum(str(runs["status"].sel(run=r).values) != "complete" for r in members))})
    return pd.DataFrame(rows).set_index("method")


def describe_choice(point: Mapping) -> str:
    """A chosen grid point in a few words: `lr`, `weight_decay`, model options and the method's own options (the
    fixed weights rounded, their source left out)."""
    parts = []
    for key, value in point.items():
        if key == "aggregator":
            continue
        if isinstance(value, Mapping):
            inner = {k: ([round(w, 3) for w in v] if k == "weights" else v) for k, v in value.items() if k != "source"}
            parts += [f"{k}={v}" for k, v in inner.items()]
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def table2(results: Mapping[str, TunedStudy], tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The counterpart of paper B's Table 2: per setting, Δ_mtm (mean ± std over seeds) of the fixed weights, the
    uniform loss and the SMTO the weights came from (the best on validation)."""
    rows = []
    for name, result in results.items():
        table = tables[name]
        for role, label in (("fixed weights", result.fixed_label), ("uniform loss", "uniform"),
                            ("best SMTO (on validation)", result.fixed_from)):
            if label is None or label not in table.index:
                continue
            row = table.loc[label]
            rows.append({"setting": name, "method": role, "which": label,
                         "delta_mtm": f"{row['delta_mtm']:+.2f} ± {row['delta_mtm_std']:.2f}",
                         "mean_rank": row["mean_rank"]})
    return pd.DataFrame(rows, columns=["setting", "method", "which", "delta_mtm", "mean_rank"])


# --- the verdict -------------------------------------------------------------------------------------------------


def compare(table: pd.DataFrame, a: str, b: str) -> str:
    """'better', 'worse' or 'similar': `a` against `b` by their Δ_mtm, significant when the mean ± 2 std intervals
    over seeds do not overlap (paper A's rule); 'unknown' without two seeds of each."""
    if a not in table.index or b not in table.index:
        return "unknown"
    ma, sa = float(table.loc[a, "delta_mtm"]), float(table.loc[a, "delta_mtm_std"])
    mb, sb = float(table.loc[b, "delta_mtm"]), float(table.loc[b, "delta_mtm_std"])
    if not all(np.isfinite([ma, sa, mb, sb])):
        return "unknown"
    if ma - 2 * sa > mb + 2 * sb:
        return "better"
    if ma + 2 * sa < mb - 2 * sb:
        return "worse"
    return "similar"


@dataclass(frozen=True)
class SettingClaims:
    setting: str
    conflict: float  # the uniform runs' conflict level
    smtos: int  # SMTOs compared
    smtos_better: tuple[str, ...]  # significantly better than the uniform loss
    smtos_worse: tuple[str, ...]  # significantly worse
    best: str | None  # the SMTO of highest mean test Δ_mtm
    best_vs_uniform: str  # 'better', 'similar', 'worse', 'unknown'
    fixed_vs_source: str  # the fixed weights against the SMTO they came from
    fixed_vs_uniform: str


@dataclass(frozen=True)
class Claims:
    settings: tuple[SettingClaims, ...]
    smtos_beat_uniform: bool | None  # some SMTO significantly better than uniform in some setting
    uniform_competitive: bool | None  # uniform not significantly worse than the best SMTO in some setting
    fixed_match: bool | None  # fixed weights not significantly worse than their SMTO in every setting with them
    interference: bool | None  # the SMTOs' gain over uniform is larger where conflict is higher (lower cosine)
    text: str


def setting_claims(setting: str, table: pd.DataFrame, fixed_label: str | None, fixed_from: str | None) -> SettingClaims:
    """One setting's comparisons from its `method_table` (rows: `uniform`, the SMTOs, the fixed weights)."""
    smtos = [m for m in table.index if m != "uniform" and m != fixed_label]
    outcome = {m: compare(table, m, "uniform") for m in smtos}
    finite = table.loc[smtos, "delta_mtm"].dropna() if smtos else pd.Series(dtype=float)
    best = str(finite.idxmax()) if len(finite) else None
    return SettingClaims(
        setting, float(table.loc["uniform", "conflict"]) if "uniform" in table.index else np.nan, len(smtos),
        tuple(m for m in smtos if outcome[m] == "better"), tuple(m for m in smtos if outcome[m] == "worse"), best,
        compare(table, best, "uniform") if best else "unknown",
        compare(table, fixed_label, fixed_from) if fixed_label else "unknown",
        compare(table, fixed_label, "uniform") if fixed_label else "unknown")


def claims(tables: Mapping[str, pd.DataFrame], fixed: Mapping[str, tuple[str | None, str | None]], *,
           context: str = "") -> Claims:
    """Which of paper B's claims hold in these results: `tables` setting -> its `method_table`, `fixed` setting ->
    (the fixed weights' label, the SMTO they came from).

    - "SMTOs perform well compared to the uniform loss": some SMTO has a significantly higher Δ_mtm than the uniform
      loss in some setting;
    - "the uniform loss can perform similarly to SMTOs": in some setting the uniform loss is not significantly worse
      than the best SMTO;
    - "fixed weights can match SMTOs": in every setting that has them, the fixed weights are not significantly worse
      than the SMTO they came from;
    - "SMTOs help where tasks interfere": with two settings or more, in the setting of highest conflict (lowest
      (1/K) Σ cos(g_k, ḡ) under the uniform loss) the best SMTO is significantly better than the uniform loss and
      its gain over it is the largest of all settings.
    """
    per = tuple(setting_claims(name, table, *fixed.get(name, (None, None))) for name, table in tables.items())
    known = [s for s in per if s.best_vs_uniform != "unknown"]
    smtos_beat = any(s.smtos_better for s in per) if known else None
    uniform_ok = any(s.best_vs_uniform in ("similar", "worse") for s in known) if known else None
    with_fixed = [s for s in per if s.fixed_vs_source != "unknown"]
    fixed_ok = all(s.fixed_vs_source in ("similar", "better") for s in with_fixed) if with_fixed else None
    gains = {s.setting: float(tables[s.setting].loc[s.best, "delta_mtm"] - tables[s.setting].loc["uniform", "delta_mtm"])
             for s in per if s.best is not None and "uniform" in tables[s.setting].index and np.isfinite(s.conflict)}
    interference = None
    if len(gains) >= 2:  # the most conflicting setting: the lowest mean cosine to the mean gradient
        most = min(gains, key=lambda name: next(s.conflict for s in per if s.setting == name))
        significant = next(s.best_vs_uniform for s in per if s.setting == most) == "better"
        interference = bool(significant and gains[most] == max(gains.values()))
    return Claims(per, smtos_beat, uniform_ok, fixed_ok, interference, _claims_text(per, smtos_beat, uniform_ok, fixed_ok,
                                                                                  interference, gains, context))


def _verdict(value: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "**cannot be judged**"}[value]


def _claims_text(per, smtos_beat, uniform_ok, fixed_ok, interference, gains, context) -> str:
    where = f" {context}" if context else ""
    lines = []
    for s in per:
        better = ", ".join(s.smtos_better) or "none"
        worse = ", ".join(s.smtos_worse) or "none"
        lines.append(f"- **{s.setting}** (conflict (1/K) Σ cos(g_k, ḡ) = {s.conflict:.3f} under the uniform loss): "
                     f"of {s.smtos} SMTOs, significantly better than the uniform loss: {better}; significantly worse: "
                     f"{worse}. The best SMTO on test ({s.best}) is {s.best_vs_uniform} against the uniform loss; the "
                     f"fixed weights are {s.fixed_vs_source} against the SMTO they came from and {s.fixed_vs_uniform} "
                     "against the uniform loss.")
    if interference is None:
        interference_text = "it needs two settings or more with a conflict level"
    else:
        ordered = ", ".join(f"{name} {gain:+.2f} at conflict {next(s.conflict for s in per if s.setting == name):.3f}"
                            for name, gain in gains.items())
        interference_text = (f"the best SMTO's gain in Δ_mtm points over the uniform loss: {ordered}; it must be "
                             "significant and the largest where the conflict is highest (the lowest cosine)")
    summary = (
        f"Paper B's claims{where} (significance: mean ± 2 std over seeds do not overlap): "
        f"\"SMTOs perform well compared to the uniform loss\" {_verdict(smtos_beat)}; "
        f"\"the uniform loss can perform similarly to SMTOs\" {_verdict(uniform_ok)}; "
        f"\"fixed weights can match SMTOs\" {_verdict(fixed_ok)}; "
        f"\"SMTOs help most where tasks interfere\" {_verdict(interference)}"
        + (f" ({interference_text})" if interference_text else "") + ".")
    return summary + "\n\n" + "\n".join(lines)
