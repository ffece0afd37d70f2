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
# # Appendix C: full task results, and Figure 2
#
# For every setting this profile ran (FashionMTL and the paper's other settings listed in the profile's studies):
# each target task's results with **every score of the task**, alone (STL) and in multi-task training (MTL), with
# Δ and its significance; its trajectories (test score and each factor against the training loss); and the factors
# compared two ways, over epoch windows (§4.1's Table 1) and at comparable training loss (Appendix B.4's loss bins).
# The runs are those of §3 and §4.1 (the same configurations: read from the results folder, not trained again).
#
# **Figure 2** (generalization against training loss for the tasks with significant transfer, in every setting)
# is drawn here rather than in §3: it gathers the tasks that the per-setting tables below find significant, across
# settings, into one figure; §3 draws each setting's curves within its own section.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_mtl"
setting_options = {"train_size": 1000, "val_size": 200, "test_size": 200, "data_seed": 0}
target = "fashion1"
partners = ["fashion2", "noisy_fashion", "notmnist"]
seeds = [0, 1]
epochs = 3
optimizer = "momentum"
lr = 0.01
batch_size = 128
loss_scale = "sum"
model = "lenet"
model_options = {"dropout": 0.5}
metrics = {"factors": ["sharpness", "fisher_trace", "coherence"], "examples": 512}
selection = {}  # the same block as §3's, so that the same configuration is chosen and its runs are reused
studies = []  # the other settings: one mapping each (see mtlcore.analysis.studies)
loss_bins = {"n_bins": 20, "skip_highest": 2, "early_width": 4, "end_width": 3}  # Appendix B.4's bands
device = "auto"
executor = ""  # where runs train: "" = what `mtlcore batch --executor` chose (else sequential)

# %% tags=["hide-input"]
import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from mtlcore import settings
from mtlcore.analysis import appendix, comparisons, plots
from mtlcore.analysis import studies as other_settings
from mtlcore.training import selection as validation_selection
from mtlcore.training.results import save_atomic
from mtlcore.training.runner import base_config, diverged_runs, grid, load_runs

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
described = settings.get(setting)
names, setting_name = described.display_names, described.display_name
base = base_config(globals())
task_sets = [[target]] + [[target, p] for p in partners]
study_specs = [other_settings.Study.from_dict(spec) for spec in studies]  # checked before anything trains
run_options = {"executor": executor} if executor else {}
if selection:  # the configuration chosen on validation (the same runs and choice as in §3)
    base.update(validation_selection.select(base, selection, task_sets, results_dir, data_root=data_root or None,
                                            **run_options).chosen)
variables = comparisons.table1_variables(metrics.get("factors", []))


def factor_tables(runs, labels, variables, reference):
    """Δ of each factor over epoch windows (Table 1) and at comparable loss (Appendix B.4), side by side."""
    if not variables:
        return None, {}
    windows = comparisons.delta_table(comparisons.trajectory_summaries(runs)[variables], labels, reference)
    binned, bands = comparisons.binned_summaries(runs, **loss_bins)
    rows = []
    for label in windows.index.drop(reference):
        for v in variables:
            row = {"configuration": label, "factor": v,
                   "Δ epoch window": f"{windows.loc[label, f'delta_{v}']:+.4g}" + (" ✱" if windows.loc[label, f"significant_{v}"] else "")}
            if v in binned:
                d = comparisons.delta_table(binned[[v]], labels, reference)
                value = d.loc[label, f"delta_{v}"]
                row["Δ at comparable loss"] = ("–" if not np.isfinite(value) else f"{value:+.4g}" + (" ✱" if d.loc[label, f"significant_{v}"] else ""))
                row["loss band"] = f"{bands[v][0]:.3g}–{bands[v][1]:.3g}"
                row["runs with a value in the band (all configurations)"] = int(np.isfinite(binned[v].values).sum())
            rows.append(row)
    return pd.DataFrame(rows).set_index(["configuration", "factor"]), bands


# %% [markdown]
# ## How the two factor summaries differ
# §4.1's Table 1 reduces a factor to one number per trajectory over **epoch windows**: sharpness and gradient
# covariance over the last 20 epochs' checkpoints, the Fisher trace over its 20 largest values. Two trajectories
# then compare at the same *time*, even when one has reached a training loss far below the other; since these
# factors shrink with the loss (smaller gradients), a window can credit MTL or STL with a difference that is only
# a difference in loss. Appendix B.4 instead compares them at **comparable training loss**: 20 geometric bins
# over the trajectories' loss range; the Fisher trace is averaged over an early-phase band (bins just below the
# first, abnormally high-loss ones: `skip_highest` bins skipped, the next `early_width` taken, over every trajectory
# of the comparison together), sharpness and covariance over an end-of-training band set by the trajectory with
# the highest minimum loss (its `end_width` lowest bins), so that every trajectory is read at losses all of them
# reach. A run with no measured checkpoint in the band has no value there ("–"), which happens when factors are
# measured every few epochs only. ✱: significant (±2 std intervals over seeds do not overlap).

# %% [markdown]
# ## FashionMTL

# %% tags=["remove-stderr", "hide-input"]
configs = grid(base, tasks=task_sets, seed=seeds)
runs = load_runs(configs, results_dir, data_root=data_root or None, **run_options)
runs = comparisons.label_configurations(runs, target, names)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")
target_runs = runs.sel(task=target)
order = ["STL"] + [comparisons.configuration_label([target, p], target, names) for p in partners]

# %% tags=["hide-input"]
target_scores = described.task(target).scores  # every score of the task, the primary first
fashion_table = appendix.task_table(target_runs, target_runs["configuration"], target_scores)
display(Markdown(f"**{names.get(target, target)}**: generalization of every score (mean ± std over seeds; rates in "
                 "points), Δ to STL (positive: better; ✱ significant)."))
display(appendix.shown_task_table(fashion_table, target_scores))
fashion_factors, _ = factor_tables(target_runs, target_runs["configuration"], variables, "STL")
if fashion_factors is not None:
    display(Markdown("Factors (lower is better), Δ = MTL − STL over epoch windows and at comparable training loss:"))
    display(fashion_factors)

# %% tags=["hide-input"]
fig = plots.factors_vs_loss(target_runs, ["test_score", *variables], group="configuration", order=order,
                            title=f"{setting_name} ({profile} profile): {names.get(target, target)}'s trajectories")
plots.publish(fig, "Figure C.1 (Appendix C)", f"{names.get(target, target)}'s test score and factors against its "
              "training loss, STL and each MTL pair, mean ± 2 std over seeds.", results_dir, "appendix_c-fashion_mtl")

# %% [markdown]
# ## The other settings
# Which settings this profile ran, and why the others were not run:

# %% tags=["hide-input"]
statuses = [other_settings.prepare(study, data_root or None, results_dir) for study in study_specs]
display(Markdown(other_settings.overview_markdown(
    statuses, fashion_mtl=f"ran on the real data: {names.get(target, target)} with each partner (above)")))

# %% tags=["remove-stderr", "hide-input"]
study_results = {}
for status in [s for s in statuses if s.ran]:
    study = status.study
    study_names = settings.get(study.setting).display_names
    study_variables = comparisons.table1_variables(study.config.get("metrics", {}).get("factors", []))
    display(Markdown(f"### {study.display_name}\n{study.display_name} {status.reason}: {len(study.tasks)} tasks "
                     f"together, {len(study.targets)} of them also alone, seeds {list(study.seeds)}."))
    study_runs, _ = other_settings.run(status, results_dir, **run_options)
    print("diverged runs (left out of every summary):", diverged_runs(study_runs) or "none")
    study_results[study.setting] = (study, study_runs, other_settings.target_table(study_runs, study))
    for task in study.targets:
        task_runs = other_settings.target_runs(study_runs, study, task)
        task_scores = settings.get(study.setting).task(task).scores
        table = appendix.task_table(task_runs, task_runs["configuration"], task_scores)
        display(Markdown(f"**{study_names.get(task, task)}**: every score (mean ± std; rates in points), Δ = MTL − STL "
                         "(positive: better; ✱ significant)."))
        display(appendix.shown_task_table(table, task_scores))
        factors_table, _ = factor_tables(task_runs, task_runs["configuration"], study_variables, "STL")
        if factors_table is not None:
            display(factors_table)
        figure = plots.factors_vs_loss(task_runs, ["test_score", *study_variables], group="configuration",
                                       order=["STL", "MTL"],
                                       title=f"{study.display_name} ({profile} profile): {study_names.get(task, task)}")
        plots.publish(figure, f"Figure C.{study.setting}.{task} (Appendix C)", f"{study.display_name}, "
                      f"{study_names.get(task, task)}: test score and factors against training loss, STL and MTL, "
                      "mean ± 2 std over seeds.", results_dir, f"appendix_c-{study.setting}-{task}")

# %% [markdown]
# ## Figure 2: generalization against training loss where transfer is significant
# The paper's Figure 2 draws, for the tasks of each setting whose generalization changes significantly under MTL,
# the test score against the training loss, STL and MTL (mean ± 2 std over seeds). A setting of this run without a
# significant transfer shows its task of largest |Δ| instead, marked "not significant".

# %% tags=["hide-input"]
panels = []
significant = fashion_table.drop(index="STL")
score = target_scores[0].name
significant = significant[significant[f"significant_{score}"].astype(bool)]
chosen = list(significant.index) or [fashion_table.drop(index="STL")[f"delta_{score}"].abs().idxmax()]
for label in chosen:
    mark = "" if label in significant.index else " (not significant)"
    sub = target_runs.where(target_runs["configuration"].isin(["STL", label]), drop=True)
    panels.append((f"{setting_name}: {names.get(target, target)}, {label}{mark}", sub, ["STL", label]))
for name, (study, study_runs, table) in study_results.items():
    study_names = settings.get(name).display_names
    marked = table[table["significant_generalization"].astype(bool)]
    tasks = list(marked.index) or [table["delta_generalization"].abs().idxmax()]
    for task in tasks:
        mark = "" if task in marked.index else " (not significant)"
        panels.append((f"{study.display_name}: {study_names.get(task, task)}{mark}",
                       other_settings.target_runs(study_runs, study, task), ["STL", "MTL"]))
columns = min(4, len(panels))
rows = int(np.ceil(len(panels) / columns))
fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.5 * rows), squeeze=False)
for ax, (title, panel_runs, panel_order) in zip(axes.flat, panels):
    plots.generalization_vs_loss(panel_runs, group="configuration", order=panel_order, ax=ax, title=title,
                                 ylabel=f"test {panel_runs['primary_score'].item()}")
    ax.title.set_fontsize("small")
for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
fig.suptitle(f"Figure 2 ({profile} profile): generalization against training loss")
fig.tight_layout()
plots.publish(fig, "Figure 2 (paper A)", "Test score against training loss, STL and MTL (mean ± 2 std over seeds), "
              "for the tasks of each setting whose transfer is significant (else the task of largest |Δ|, marked "
              "not significant).", results_dir, "appendix_c-figure2")

# %% tags=["hide-input"]
analysis_ds = comparisons.table_dataset(fashion_table, "fashion_mtl")
for name, (study, study_runs, table) in study_results.items():
    analysis_ds = analysis_ds.merge(other_settings.table_dataset(table, study))
analysis_ds.attrs.update(profile=profile, target=target, seeds=json.dumps(seeds), loss_bins=json.dumps(loss_bins),
                         figure2_panels=json.dumps([title for title, _, _ in panels]),
                         settings_run=json.dumps(["fashion_mtl", *study_results]))
save_atomic(analysis_ds, results_dir / "appendix_c.nc")
print("analysis written to appendix_c.nc in the results folder")
