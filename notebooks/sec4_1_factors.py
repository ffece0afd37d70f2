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
# # §4.1 Do single-task explanations of generalization explain transfer?
#
# The paper measures, along every trajectory, factors known to explain generalization gaps between
# single-task trajectories: **sharpness** (worst-case adaptive ℓ∞ m-sharpness, Eq. 3), the **trace of
# the Fisher information** (its early explosion, Eq. 5), and **gradient coherence** (the trace of the
# gradient covariance, Eq. 4). If one of them explained transfer, MTL with a helpful partner would be
# better on it than STL, and MTL with a harmful partner worse (lower is better for all three). This
# chapter draws the counterparts of Figure 3 and Table 1; the paper's answer is the `expected` parameter.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_mtl"
setting_options = {"train_size": 1000, "val_size": 200, "test_size": 200, "data_seed": 0}
target = "fashion1"
partners = ["fashion2", "noisy_fashion", "notmnist"]
expected = {"factor_explains_both_directions": False}
seeds = [0, 1]
epochs = 3
optimizer = "momentum"
lr = 0.01
batch_size = 128
loss_scale = "sum"
model = "lenet"
model_options = {"dropout": 0.5}
metrics = {"factors": ["sharpness", "fisher_trace", "coherence"], "examples": 512}
selection = {}  # e.g. {"grid": {"lr": [0.01, 0.001]}, "seeds": [0]}: choose those values on validation first
studies = []  # the other settings: one mapping each (see mtlcore.analysis.studies)
device = "auto"
# where runs train; empty: what mtlcore batch was given (--executor), else sequential
executor = ""

# %% tags=["hide-input"]
import json
import logging
from pathlib import Path

from IPython.display import Markdown, display

from mtlcore import settings
from mtlcore.analysis import claims as paper_claims
from mtlcore.analysis import comparisons, plots, sections
from mtlcore.analysis import studies as other_settings
from mtlcore.training import selection as validation_selection
from mtlcore.training.results import save_atomic
from mtlcore.training.runner import base_config, diverged_runs, grid, load_runs

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
described = settings.get(setting)  # for its display names in labels and titles
names, setting_name = described.display_names, described.display_name
base = base_config(globals())  # the run-config parameters of this notebook
task_sets = [[target]] + [[target, p] for p in partners]
study_specs = [other_settings.Study.from_dict(spec) for spec in studies]  # checked before anything trains
if selection:  # the configuration chosen on validation (the same runs and choice as in §3)
    chosen = validation_selection.select(base, selection, task_sets, results_dir, data_root=data_root or None,
                                         executor=executor)
    base.update(chosen.chosen)
    display(Markdown(validation_selection.describe(chosen)))
configs = grid(base, tasks=task_sets, seed=seeds)
print(f"{len(configs)} runs; factors {metrics['factors']} on the first {metrics.get('examples', 2048)} "
      f"training examples, every {metrics.get('every', 1)} epoch(s)")

# %% tags=["remove-stderr", "hide-input"]
runs = load_runs(configs, results_dir, data_root=data_root or None, executor=executor)
runs = comparisons.label_configurations(runs, target, names)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")
target_runs = runs.sel(task=target)
order = ["STL"] + [comparisons.configuration_label([target, p], target, names) for p in partners]

# %% [markdown]
# ## Figure 3: each factor of the target task against its training loss
# Mean ± 2 std over seeds at every measured epoch; the loss axis decreases to the right.

# %% tags=["hide-input"]
variables = comparisons.table1_variables(metrics["factors"])  # coherence: the gradient-covariance trace
fig = plots.factors_vs_loss(target_runs, variables, group="configuration", order=order,
                            title=f"{setting_name} ({profile} profile): factors of {names.get(target, target)}")
plots.publish(fig, "Figure 3 (paper A)", f"The factors of {names.get(target, target)}'s trajectory against its training "
              "loss, STL and each MTL pair, mean ± 2 std over seeds at every measured epoch.", results_dir,
              "sec4_1-figure3")

# %% [markdown]
# ## Table 1: Δ = MTL − STL
# One number per trajectory (the paper's Appendix B.4): generalization = mean test score of the 10
# best-validation checkpoints; sharpness and coherence = mean over the last 20 epochs' checkpoints; FIM
# = mean of the largest values, as many as 20 epochs hold (with factors measured every n-th epoch: the
# last or largest ceil(20/n)). The untrained model (epoch 0) and runs that diverged are left out. The Δ
# of generalization is signed so that positive is better; the factors' Δ is MTL − STL (lower is better).
# ✱ marks a significant Δ (the ±2 std intervals over seeds do not overlap).

# %% tags=["hide-input"]
summaries = comparisons.trajectory_summaries(target_runs)
quantities = ["generalization"] + variables
table = comparisons.delta_table(summaries[quantities], target_runs["configuration"])


score_scale = 100.0 if described.task(target).primary.percent else 1.0  # generalization of a rate: in points


def marked(row, q):
    if q == "generalization":  # rounded to what the seeds resolve
        std = max(row["generalization_std"], table.loc["STL", "generalization_std"])
        return comparisons.marked_delta(row["delta_generalization"], row["significant_generalization"], std, score_scale)
    return f"{row[f'delta_{q}']:+.3g}" + (" ✱" if row[f"significant_{q}"] else "")


shown = table.drop(index="STL").apply(lambda row: {f"Δ {q.replace('_', ' ')}": marked(row, q) for q in quantities},
                                      axis=1, result_type="expand")
shown = shown.rename(columns={"Δ generalization": f"Δ generalization{' (points)' if score_scale == 100 else ''}"})
display(shown)

# %% [markdown]
# ### The same factors at comparable training loss (Appendix B.4)
# Table 1 reads each factor over **epoch windows**: the last epochs for sharpness and coherence, the largest values
# for the Fisher trace. Two trajectories are then compared at the same time, even where one has reached a much lower
# training loss, and these factors shrink with the loss. Appendix B.4 compares them at **comparable training loss**
# instead: 20 geometric bins over the trajectories' losses; the Fisher trace averaged over an early-phase band (the
# two highest-loss bins skipped, the next four taken, over every trajectory of the target together), sharpness and
# coherence over the three lowest bins of the trajectory with the highest minimum loss, so that every trajectory is
# read at losses all of them reach. "–": no measured checkpoint of the run in the band (factors measured every few
# epochs only). Appendix C shows both for every setting.

# %%
binned, bands = comparisons.binned_summaries(target_runs)
if binned.data_vars:
    binned_table = comparisons.delta_table(binned, target_runs["configuration"])
    display(binned_table.drop(index="STL").apply(
        lambda row: {f"Δ {q.replace('_', ' ')} at loss {bands[q][0]:.3g}–{bands[q][1]:.3g}":
                     "–" if row[f"delta_{q}"] != row[f"delta_{q}"] else marked(row, q) for q in binned.data_vars},
        axis=1, result_type="expand"))

# %% [markdown]
# ## Does any factor explain both the positive and the negative transfer?
# A factor explains transfer if, for every significant transfer, MTL moves it significantly in the
# opposite direction to generalization, with at least one significant positive and one significant
# negative transfer to explain.

# %% tags=["hide-input"]
finding = sections.factors_finding(table, variables, expected_explains=expected["factor_explains_both_directions"],
                                   context=f"in this run ({profile} profile, {len(seeds)} seeds)")
display(Markdown(finding.text))

# %% [markdown]
# ## Table 1 in the other settings: each task alone against every task together
# The same Δ for each target task of the paper's other settings that this profile ran (rates in points;
# the factors' Δ is MTL − STL, lower is better), with paper A's published Δ generalization beside ours
# where Table 1 gives one. Which settings this profile ran, and why the others were not run:

# %% tags=["hide-input"]
statuses = [other_settings.prepare(study, data_root or None, results_dir) for study in study_specs]
display(Markdown(other_settings.overview_markdown(  # with the files to get for each study that lacked them
    statuses, fashion_mtl=f"ran on the real data: {names.get(target, target)} with each partner (above)")))

# %% tags=["remove-stderr", "hide-input"]
study_tables, study_findings = {}, {}
for status in [s for s in statuses if s.ran]:
    study = status.study
    study_variables = comparisons.table1_variables(study.config.get("metrics", {}).get("factors", []))
    display(Markdown(f"### {study.display_name}\n{study.display_name} {status.reason}: {len(study.tasks)} tasks "
                     f"together, {len(study.targets)} of them also alone, seeds {list(study.seeds)}."))
    study_runs, _ = other_settings.run(status, results_dir, executor=executor)
    print("diverged runs (left out of every summary):", diverged_runs(study_runs) or "none")
    study_table = study_tables[study.setting] = other_settings.target_table(study_runs, study, study_variables)
    display(other_settings.shown_table(study_table, study, study_variables))
    study_finding = study_findings[study.setting] = sections.factors_finding(
        study_table.rename(index=settings.get(study.setting).display_names), study_variables,
        expected_explains=expected["factor_explains_both_directions"],
        context=f"in {study.display_name} ({profile} profile, {len(study.seeds)} seeds)")
    display(Markdown(study_finding.text))

# %% tags=["hide-input"]
analysis_ds = summaries.assign_coords(run_configuration=("run", [str(v) for v in target_runs["configuration"].values]))
analysis_ds = analysis_ds.drop_vars([c for c in analysis_ds.coords if c not in ("run", "run_configuration")])
analysis_ds = analysis_ds.merge(comparisons.table_dataset(table, "table1"))
analysis_ds.attrs.update(profile=profile, target=target, seeds=str(seeds), factors=",".join(metrics["factors"]),
                         expected=json.dumps(expected), finding=finding.answer,
                         other_settings=json.dumps({s.study.setting: s.reason.split(chr(10))[0] for s in statuses}),
                         other_findings=json.dumps({name: f.answer for name, f in study_findings.items()}),
                         **paper_claims.claims_attr([paper_claims.finding_claim("A4.1-factors", finding)]))
for status in [s for s in statuses if s.ran]:
    analysis_ds = analysis_ds.merge(other_settings.table_dataset(study_tables[status.study.setting], status.study))
save_atomic(analysis_ds, results_dir / "sec4_1_factors.nc")
print("analysis written to sec4_1_factors.nc in the results folder")
