# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Companion study: the uniform loss against tuned SMTOs, and fixed weights (paper B)
#
# Paper B (*Uniform Loss vs. Specialized Optimization*) asks whether specialized multi-task optimizers (SMTOs) beat
# the uniform loss once the learning rate and the regularisation are tuned for each method, and whether constant
# task weights taken from an SMTO match it. Its findings: SMTOs perform well compared to the uniform loss, fixed
# weights can be competitive with SMTOs, and the uniform loss can perform similarly to SMTOs, which the paper relates
# to how much the tasks interfere.
#
# Here, for each setting of the profile: every task alone (the single-task baselines), and all tasks together under
# the uniform loss and each SMTO, each method with its own learning rate, weight decay and own options chosen on
# validation (the grid point of lowest mean rank of the best validation score over the tasks, on the search seeds);
# the chosen configuration re-run over the seeds and scored on test at each task's best-validation epoch. Then
# constant weights from the SMTO that validates best: its per-epoch mean task weights, each epoch normalised to sum 1,
# an exponential moving average (β = 0.9), renormalised, trained as `aggregator: fixed` (tuned over the same grid)
# with the run they came from recorded in the run's configuration. Δ_mtm is paper B's relative gain over the
# single-task baselines (positive: better; a lower-is-better score counts with the opposite sign), MR the mean rank
# over every task's scores, and the conflict level paper B's (1/K) Σ_k cos(g_k, ḡ), measured along training.
# MultiFashion puts two Fashion-MNIST items on one image with an offset, so the tasks interfere through the input.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
# Each setting as a study (mtlcore.analysis.studies.Study): setting, tasks, run-config values, optionally seeds,
# data (root or fixture) and aggregators (default: the `aggregators` below).
study_settings = [
    {"setting": "multi_fashion", "tasks": ["left", "right"],
     "setting_options": {"train_size": 256, "val_size": 128, "test_size": 256, "offset": 8, "data_seed": 0},
     "model": "lenet"},
]
common = {"optimizer": "adam", "batch_size": 64, "epochs": 2, "loss_scale": "sum", "model_options": {"dropout": 0.5}}
aggregators = ["cagrad", "famo"]  # or "all": every SMTO of the registry
search_space = {"grid": {"lr": [0.001, 0.005]}, "options": {"cagrad": {"c": [0.2, 0.5]}}, "seeds": [0]}
seeds = [0, 1]
metrics = {"factors": ["conflict_to_mean"], "examples": 128, "conflict_to_mean": {"num_batches": 2}}
ema_beta = 0.9
device = "auto"
executor = ""  # where runs train; empty: what mtlcore batch was given (--executor), else sequential

# %% tags=["remove-input", "remove-stderr"]
import json
import logging
import time
from pathlib import Path

import pandas as pd
import xarray as xr
from IPython.display import HTML, Markdown, display

from mtlcore.analysis import claims as paper_claims
from mtlcore.analysis import plots, tuned
from mtlcore.analysis import studies as other_settings
from mtlcore.training.results import save_atomic

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
specs = [other_settings.Study.from_dict({**common, "device": device, "seeds": seeds, **spec}) for spec in study_settings]
methods = {spec.setting: tuned.smtos(aggregators if spec.aggregators is None else list(spec.aggregators),
                                     len(spec.tasks)) for spec in specs}  # checked before anything trains
for spec in specs:
    tuned.check_search(search_space, ["uniform", *methods[spec.setting]])
statuses = [other_settings.prepare(spec, data_root or None, results_dir) for spec in specs]
display(Markdown("Settings of this profile: " + "; ".join(
    f"**{s.study.display_name}** ({', '.join(s.study.tasks)}): {s.reason.split(chr(10))[0]}" for s in statuses) + "."))
for status in [s for s in statuses if not s.ran and "\n" in s.reason]:
    display(Markdown(f"**{status.study.display_name}** {status.reason}"))

# %% tags=["remove-stderr", "remove-input"]
results, seconds = {}, {}
for status in [s for s in statuses if s.ran]:
    started = time.perf_counter()
    results[status.study.display_name] = tuned.run_study(status, methods[status.study.setting], search_space,
                                                          results_dir, metrics=metrics,
                                                          beta=ema_beta, executor=executor or None)
    seconds[status.study.display_name] = time.perf_counter() - started
display(Markdown("\n".join(
    f"- **{name}**: {r.search_runs} search runs on seed(s) {search_space.get('seeds', [0])}, "
    f"{r.runs.sizes['run']} final runs over seeds {list(r.status.study.seeds)} (the search's runs on a final seed are "
    f"reused), {len(r.methods) - 1} SMTO{'' if len(r.methods) == 2 else 's'}; {seconds[name]:.0f} s in this execution (runs already on disk are read, "
    "not retrained)" for name, r in results.items()) or "No setting of this profile could run here."))

# %% [markdown]
# ## Table 2: fixed weights against the uniform loss and the best SMTO
# Δ_mtm in percent (mean ± std over seeds) and mean rank among every tuned method of the setting. The best SMTO is
# the one of highest mean validation Δ_mtm, the SMTO the fixed weights come from.

# %% tags=["remove-input"]
tables = {name: tuned.method_table(result) for name, result in results.items()}
if results:
    display(tuned.table2(results, tables).rename(columns={"delta_mtm": "Δ_mtm (%, mean ± std)", "mean_rank": "MR"})
            .style.hide(axis="index").format({"MR": "{:.2f}"}))
    for name, result in results.items():
        if result.fixed_from:
            display(Markdown(f"{name}: weights {[round(w, 4) for w in result.fixed_weights]} (tasks "
                             f"{', '.join(result.status.study.tasks)}) from the {result.fixed_from} run "
                             f"`{result.fixed_source}` (EMA β = {ema_beta})."))
        else:
            display(Markdown(f"{name}: no SMTO recorded task weights, so no fixed weights."))

# %% [markdown]
# ## Every tuned method, per setting
# The chosen configuration, Δ_mtm (mean and std over seeds, %), the number of seeds, the mean rank (MR) over every
# (task, score) of the setting, and the conflict level (1/K) Σ_k cos(g_k, ḡ) along training (1: the task gradients
# agree; 0 or below: they conflict). Sorted by Δ_mtm.

# %% tags=["remove-input"]
for name, table in tables.items():
    display(Markdown(f"### {name}"))
    shown = table.sort_values("delta_mtm", ascending=False).rename(columns={
        "delta_mtm": "Δ_mtm (%)", "delta_mtm_std": "std", "mean_rank": "MR", "conflict": "(1/K) Σ cos(g_k, ḡ)"})
    display(shown.style.format({"Δ_mtm (%)": "{:+.2f}", "std": "{:.2f}", "MR": "{:.2f}", "(1/K) Σ cos(g_k, ḡ)": "{:.3f}"}))
    result = results[name]
    searched = pd.concat([s.table.assign(method=m) for m, s in
                          [*result.methods.items(), *([(result.fixed_label, result.fixed)] if result.fixed else [])]],
                         ignore_index=True)
    if "aggregator_options" in searched:
        searched["aggregator_options"] = searched["aggregator_options"].map(
            lambda o: tuned.describe_choice({"options": o}) if isinstance(o, dict) else "")
    searched = searched.drop(columns=[c for c in ("aggregator",) if c in searched])
    display(HTML(f"<details><summary>{name}: every grid point of the search ({len(searched)} points, mean rank of "
                 "the best validation score; ✔ chosen)</summary>" + searched.to_html(index=False) + "</details>"))

# %% [markdown]
# ## Figure: Δ_mtm of every tuned method
# Mean over seeds with ±2 std whiskers; the dashed line is the uniform loss, hatched bars the fixed weights.

# %% tags=["remove-input"]
if tables:
    fig = plots.delta_mtm_by_method(list(tables.items()), title=f"{profile} profile: tuned methods vs single-task")
    plots.publish(fig, "Figure B.1 (paper B, Table 2 drawn)", "Δ_mtm (%, positive: better than single-task) of every "
                  "tuned method, mean over seeds with ±2 std whiskers; dashed: the uniform loss; hatched: the fixed "
                  "weights.", results_dir, "paperb-delta-mtm")

# %% [markdown]
# ## Conflict along training
# Paper B's (1/K) Σ_k cos(g_k, ḡ) under the uniform loss, the best SMTO and the fixed weights taken from it (each run
# measures it on its training examples; the level of a setting is the uniform loss's mean over the trained epochs).

# %% tags=["remove-input"]
if results:
    fig = plots.conflict_along_training(
        [(name, r.runs) for name, r in results.items()],
        [[label for label in ("uniform", r.fixed_from, r.fixed_label) if label] for r in results.values()],
        title=f"{profile} profile")
    plots.publish(fig, "Figure B.2 (paper B's conflict measure)", "(1/K) Σ_k cos(g_k, ḡ) along training under the "
                  "uniform loss, the best SMTO and the fixed weights taken from it, per setting.", results_dir,
                  "paperb-conflict")
    display(pd.DataFrame({"conflict level (uniform loss)": {n: t.loc["uniform", "conflict"] for n, t in tables.items()}})
            .style.format("{:.3f}"))

# %% [markdown]
# ## Which of paper B's claims hold here?

# %% tags=["hide-input"]
finding = tuned.claims(tables, {name: (r.fixed_label, r.fixed_from) for name, r in results.items()},
                       context=f"in this run ({profile} profile, {len(seeds)} seeds)")
display(Markdown(finding.text))

# %% tags=["remove-input"]
rows = [table.reset_index().assign(setting=name) for name, table in tables.items()]
if rows:
    frame = pd.concat(rows, ignore_index=True)
    analysis_ds = xr.Dataset.from_dataframe(frame.rename_axis("entry")).rename(method="label")
    analysis_ds.attrs.update(
        profile=profile, seeds=json.dumps(seeds), search=json.dumps(search_space), aggregators=json.dumps(aggregators),
        paper_b_claims=json.dumps({"smtos_beat_uniform": finding.smtos_beat_uniform,
                                   "uniform_competitive": finding.uniform_competitive,
                                   "fixed_match": finding.fixed_match, "interference": finding.interference}),
        **paper_claims.claims_attr([
            paper_claims.boolean_claim("B-smtos", finding.smtos_beat_uniform,
                                       "some SMTO is significantly better than the uniform loss in some setting"
                                       if finding.smtos_beat_uniform else "no SMTO is significantly better than the "
                                       "uniform loss in any setting", otherwise=paper_claims.NOT_SHOWN),
            paper_claims.boolean_claim("B-uniform", finding.uniform_competitive,
                                       "in some setting the uniform loss is not significantly worse than the best SMTO"
                                       if finding.uniform_competitive else "the best SMTO beats the uniform loss "
                                       "significantly in every setting"),
            paper_claims.boolean_claim("B-fixed", finding.fixed_match,
                                       "the fixed weights are not significantly worse than the SMTO they came from"
                                       if finding.fixed_match else "fixed weights are significantly worse than their "
                                       "SMTO in some setting"),
            paper_claims.boolean_claim("B-interference", finding.interference,
                                       "the best SMTO's gain over the uniform loss is significant and largest where "
                                       "the conflict is highest" if finding.interference else "the best SMTO's gain "
                                       "over the uniform loss is not both significant and largest in the most "
                                       "conflicting setting",
                                       otherwise=paper_claims.NOT_SHOWN)]),
        fixed=json.dumps({n: {"from": r.fixed_from, "source_run": r.fixed_source,
                              "weights": list(r.fixed_weights) if r.fixed_weights else None} for n, r in results.items()}))
    save_atomic(analysis_ds, results_dir / "paperb_uniform.nc")
    print("analysis written to paperb_uniform.nc in the results folder")
