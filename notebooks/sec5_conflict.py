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
# # §5 Does gradient conflict explain the impact on optimization or on generalization?
#
# The paper trains a few target tasks of CIFAR-100 with **random sets of auxiliary tasks**: changing the set
# changes how much the target's gradient conflicts with the multi-task update it follows. It measures that
# conflict as the cosine between the target's gradient and the uniform multi-task gradient (Eq. 6, averaged over
# random training batches, every epoch) and sets its mean over training against each trajectory factor of §4
# (Figure 5) and against the target's generalization (Figure 6). Its answer: more conflict goes with larger
# factors (sharper minima, a larger Fisher explosion, a larger gradient covariance), yet it does not predict
# generalization. The paper's answer is the `expected` parameter.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_pool"
setting_options = {"train_size": 128, "val_size": 128, "test_size": 256, "data_seed": 0}
targets = ["fashion"]
pool = []  # the tasks auxiliary sets are drawn from (empty: every task of the setting)
set_sizes = [1, 2]
sets_per_size = 2
draw_seed = 0  # the seed of the random auxiliary sets (mtlcore.analysis.conflict_study.draw_aux_sets)
include_stl = True  # also train each target alone: the reference line of the figures
analog = True  # a stand-in for the paper's CIFAR-100 study: the chapter says so
expected = {"conflict_predicts_factors": True, "conflict_predicts_generalization": False}
loss_bins = {"n_bins": 20, "skip_highest": 2, "early_width": 4, "end_width": 3}  # Appendix B.4's bands
seeds = [0]
epochs = 2
optimizer = "adam"
lr = 0.001
batch_size = 32
loss_scale = "sum"
model = "lenet"
model_options = {"dropout": 0.5}
metrics = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 64,
           "sharpness": {"steps": 3}, "coherence": {"large_batch": 64}, "conflict": {"num_batches": 4}}
device = "auto"
executor = ""  # where runs train: "" = what `mtlcore batch --executor` chose (else sequential)

# %% tags=["hide-input"]
import json
import logging
from pathlib import Path

import pandas as pd
import xarray as xr
from IPython.display import Markdown, display

from mtlcore import settings
from mtlcore.analysis import claims as paper_claims
from mtlcore.analysis import comparisons, conflict_study, plots
from mtlcore.analysis import studies as other_settings
from mtlcore.training.results import save_atomic
from mtlcore.training.runner import base_config, diverged_runs, grid, load_runs
from mtlcore.training.trainer import run_path

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
described = settings.get(setting)
names, setting_name = described.display_names, described.display_name
base = base_config(globals())  # the run-config parameters of this notebook
if "conflict" not in metrics.get("factors", []):
    raise ValueError(f"metrics.factors={metrics.get('factors')} must include 'conflict': §5 is about it")
factors = comparisons.table1_variables(metrics["factors"])  # sharpness, fisher_trace, grad_cov_trace
run_options = {"executor": executor} if executor else {}

# %% tags=["hide-input"]
if analog:
    display(Markdown(
        f"**This profile runs a CPU analog of the paper's study, not the study itself.** The paper draws auxiliary "
        f"tasks among CIFAR-100's 20 superclass tasks for CIFAR-100 targets, with a ResNet18; here the targets and the "
        f"pool are the {setting_name} tasks ({len(described.tasks)} small image tasks on the offline Fashion-MNIST "
        "and notMNIST files: 10-way Fashion-MNIST, notMNIST's letters, five binary tasks between two Fashion-MNIST "
        "classes, and 10-way Fashion-MNIST with 30 %, 60 % and 90 % of its labels replaced by a wrong class, the "
        "last pure noise), with MultiLeNet, few runs, short training and factors measured on a few examples. The "
        "pool mixes helpful, unrelated and harmful auxiliary tasks on purpose, so that the conflict varies; what "
        "it shows is whether the paper's two relations appear in this small setting, not what they are on "
        "CIFAR-100.\n\nWhere an analog run differs from the paper's study, by design: the target trains on a few hundred "
        "images for few epochs, so its trajectory stops well before convergence and the factors' \"last epochs\" lie "
        "earlier in training than the paper's; the pool's tasks differ in kind (class pairs, letters, label noise) "
        "rather than being sibling superclasses; the update is the uniform **sum** of the task gradients (Eq. 2 with "
        "C = 1) under the profile's optimizer, so that adding auxiliary tasks also shrinks the target's share of the "
        f"update; and each auxiliary set is trained on {len(seeds)} seed(s)."))
else:
    display(Markdown(f"This profile runs the paper's study: {setting_name} targets with random auxiliary sets."))

# %% [markdown]
# ## The random auxiliary sets
# For each target and each set size, distinct sets are drawn uniformly from the pool without the target, from
# `draw_seed` (the same seed gives the same sets on any machine; each run records its tasks). Every set is
# trained with the target under the uniform multi-task gradient (Eq. 2), on every seed.

# %% tags=["hide-input"]
task_pool = list(pool) or list(described.tasks)
sets = [s for target in targets for s in conflict_study.draw_aux_sets(target, task_pool, set_sizes, sets_per_size,
                                                                       seed=draw_seed)]
display(pd.DataFrame([{"target": names.get(s.target, s.target), "size": s.size, "draw": s.draw,
                       "auxiliary tasks": ", ".join(names.get(t, t) for t in s.tasks)} for s in sets])
        .set_index(["target", "size", "draw"]))
configs = {target: grid(base, tasks=([[target]] if include_stl else []) + [s.run_tasks for s in sets if s.target == target],
                        seed=seeds) for target in targets}
print(f"{sum(map(len, configs.values()))} runs: {len(targets)} target(s) x ({len(set_sizes)} sizes x {sets_per_size} "
      f"sets{' + alone' if include_stl else ''}) x {len(seeds)} seed(s); {epochs} epochs each")
# Whether the runs are on disk (trained elsewhere, say) or can train here: the setting's data under the data root,
# a GPU where the profile asks for one
on_disk = all(run_path(c, results_dir).is_file() for target_configs in configs.values() for c in target_configs)
run_tasks = sorted({task for target_configs in configs.values() for c in target_configs for task in c.tasks})
ready = None if on_disk else other_settings.prepare(other_settings.Study.from_dict(
    {**{k: v for k, v in base.items() if k != "tasks"}, "tasks": run_tasks, "targets": list(targets),
     "seeds": list(seeds)}), data_root or None, results_dir)
runnable = ready is None or ready.ran
if not runnable:
    display(Markdown(f"**{setting_name} {ready.reason}**\n\nNothing below was computed on this machine, and the "
                     "scoreboard lists this chapter's claims as not run."))

# %% tags=["remove-stderr", "hide-input"]
if runnable:
    summaries, all_runs = [], {}
    for target in targets:
        runs = all_runs[target] = load_runs(configs[target], results_dir, data_root=data_root or None, **run_options)
        print(f"{target}: diverged runs (left out of every summary):", diverged_runs(runs) or "none")
        summaries.append(conflict_study.run_summary(runs, target, sets, loss_bins=loss_bins))
    summary = pd.concat(summaries, ignore_index=True)
    mtl, alone = summary[summary["size"] > 0], summary[summary["size"] == 0]

# %% [markdown]
# ## One number per run
# The mean conflict of a run is the target's cosine to the update, averaged over the trained checkpoints where it
# was measured (lower: more conflict; a target alone has none). Generalization and the factors are the one-number
# summaries of §4.1's Table 1 (Appendix B.4): the mean test score at the 10 best-validation checkpoints, sharpness
# and gradient covariance over the last 20 epochs' checkpoints, the Fisher trace's largest values; and the minimum
# training loss. The columns ending in `_at_loss` read the same factors at comparable training loss instead
# (Appendix B.4, as Appendix C does): the Fisher trace over an early-phase band of the target's loss, sharpness and
# covariance over the end-of-training band of the least-converged run, so that a run with more conflict, which is
# less far along after the same number of epochs, is not compared at a different stage of training.

# %% tags=["hide-input"]
if runnable:
    shown = summary.assign(target=[names.get(t, t) for t in summary["target"]],
                           aux_tasks=[", ".join(names.get(a, a) for a in s.split(", ")) if s else "(alone)"
                                      for s in summary["aux_tasks"]])
    display(shown.drop(columns=["run"]).sort_values(["target", "size", "draw"]).style.format(precision=4).hide(axis="index"))

# %% [markdown]
# ## Figure 5: each factor of the target against its mean conflict
# One point per run, coloured by the size of its auxiliary set; the dashed line is the target alone. In each
# panel, Pearson's r and Spearman's ρ between the conflict (the cosine) and the factor, with their two-sided
# p-values. The paper's finding reads as a **negative** correlation here: the lower the cosine (the more conflict),
# the larger the factor.

# %% tags=["hide-input"]
if runnable:
    labels = {"fisher_trace": "Fisher trace (largest)", "sharpness": "sharpness (last)",
              "grad_cov_trace": "gradient covariance (last)", "min_train_loss": "minimum training loss",
              "generalization": "generalization (test score)"}
    figure5_quantities = factors + ["min_train_loss"]
    at_loss = [f"{f}{conflict_study.AT_LOSS}" for f in factors if f"{f}{conflict_study.AT_LOSS}" in mtl]
    table = conflict_study.correlation_table(mtl, figure5_quantities + at_loss + ["generalization"])
    labels.update({f"{f}{conflict_study.AT_LOSS}": f"{labels[f].split(' (')[0]} (comparable loss)" for f in factors})
    fig = conflict_study.scatter_against_conflict(mtl, figure5_quantities, table, labels=labels, names=names,
                                                  reference=alone, title=f"{setting_name} ({profile} profile): "
                                                  "factors against the mean conflict")
    plots.publish(fig, "Figure 5 (paper A)" + (", analog" if analog else ""), "Each factor of the target against its mean "
                  "conflict (the cosine to the update; lower: more conflict), one point per run coloured by the size of its "
                  "auxiliary set; dashed: the target alone; Pearson's r and Spearman's ρ with their p-values.", results_dir,
                  "sec5-figure5")

# %% [markdown]
# The same factors read at comparable training loss (Appendix B.4's bands; a run with no measured checkpoint in a
# band has no point):

# %% tags=["hide-input"]
if runnable:
    if at_loss:
        fig = conflict_study.scatter_against_conflict(mtl, at_loss, table, labels=labels, names=names, reference=alone,
                                                      title=f"{setting_name} ({profile} profile): factors at comparable "
                                                      "training loss against the mean conflict")
        plots.publish(fig, "Figure 5b (Figure 5 at comparable loss)", "The factors read in Appendix B.4's loss bands "
                      "against the mean conflict, as in Figure 5.", results_dir, "sec5-figure5-at-loss")

# %% [markdown]
# ## Figure 6: the target's generalization against its mean conflict

# %% tags=["hide-input"]
if runnable:
    fig = conflict_study.scatter_against_conflict(mtl, ["generalization"], table, labels=labels, names=names,
                                                  reference=alone, title=f"{setting_name} ({profile} profile): "
                                                  "generalization against the mean conflict")
    plots.publish(fig, "Figure 6 (paper A)" + (", analog" if analog else ""), "The target's generalization (mean test "
                  "score at its 10 best-validation checkpoints) against its mean conflict, one point per run.", results_dir,
                  "sec5-figure6")

# %% [markdown]
# ## The correlations, and the paper's answer
# Per target and quantity, over its multi-task runs: Pearson's r and Spearman's ρ of the mean conflict (the cosine)
# with the quantity, their two-sided p-values and the number of runs. With a handful of runs per target only strong
# relations reach p < 0.05; a large p here is an absence of evidence, not evidence of absence.

# %% tags=["hide-input"]
if runnable:
    display(conflict_study.shown_table(table, names))
    named = table.rename(index=names, level=0)  # the targets by their display names
    result = conflict_study.finding(named, factors, context=f"(in this run: {profile} profile, {len(mtl)} multi-task runs; "
                                    "factors over epoch windows)")
    display(Markdown(result.text))
    if at_loss:
        display(Markdown(conflict_study.finding(named, at_loss, context="(factors at comparable training loss)").text))
    display(Markdown(f"The paper's answer: conflict predicts the factors: {expected['conflict_predicts_factors']}; "
                     f"conflict predicts generalization: {expected['conflict_predicts_generalization']}."))

# %% tags=["hide-input"]
if runnable:
    analysis_ds = xr.Dataset.from_dataframe(summary.set_index("run"))
    correlations = table.reset_index()
    correlations.index.name = "correlation"
    analysis_ds = analysis_ds.merge(xr.Dataset.from_dataframe(correlations.astype({"quantity": str})).rename(
        {c: f"correlation_{c}" for c in correlations.columns}))
    analysis_ds.attrs.update(profile=profile, setting=setting, targets=json.dumps(targets), set_sizes=json.dumps(set_sizes),
                             loss_bins=json.dumps(loss_bins), factors_opposite=json.dumps(result.factors_opposite),
                             sets_per_size=sets_per_size, draw_seed=draw_seed, seeds=json.dumps(seeds),
                             analog=int(analog), expected=json.dumps(expected),
                             factors_follow_conflict=json.dumps(result.factors_follow_conflict),
                             generalization_follows=json.dumps([str(g) for g in result.generalization_follows]),
                             **paper_claims.claims_attr(paper_claims.conflict_claims(
                                 result, generalization_tested=bool(table.xs("generalization", level=1)["spearman_p"]
                                                                    .notna().any()))))
    save_atomic(analysis_ds, results_dir / "sec5_conflict.nc")
    print("analysis written to sec5_conflict.nc in the results folder")
