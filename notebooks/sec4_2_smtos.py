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
# # §4.2 What do specialized multi-task optimizers change?
#
# SMTOs (the `aggregators` parameter; in the paper MGDA, PCGrad and GradNorm among others) change the
# multi-task update. If their effect on generalization came through one of the trajectory factors, the
# %Δ of that factor against the uniform multi-task gradient would predict the %Δ of generalization:
# points would fall in the shaded quadrants only (better optimisation and better generalization, top
# left; worse and worse, bottom right). The counterpart of the paper's Figure 4, with minimum training
# loss as a fourth factor; the paper's answer is the `expected` parameter.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_mtl"
setting_options = {"train_size": 1000, "val_size": 200, "test_size": 200, "data_seed": 0}
target = "fashion1"
partners = ["fashion2", "noisy_fashion"]
aggregators = ["mgda", "pcgrad", "gradnorm"]
expected = {"factor_solely_in_agreeing_quadrants": False}
seeds = [0, 1]
epochs = 3
optimizer = "momentum"
lr = 0.01
batch_size = 128
loss_scale = "sum"
model = "lenet"
model_options = {"dropout": 0.5}
metrics = {"factors": ["sharpness", "fisher_trace", "coherence"], "examples": 512}
selection = {}  # as in §3 (with its `task_sets`), so that the uniform runs are §3's
studies = []  # the other settings (see mtlcore.analysis.studies): all their tasks under each aggregator
device = "auto"
# where runs train; empty: what mtlcore batch was given (--executor), else sequential
executor = ""

# %% tags=["hide-input"]
import json
import logging
from pathlib import Path

import pandas as pd
import xarray as xr
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
if selection:  # the configuration chosen on validation, shared by the uniform runs and every SMTO
    chosen = validation_selection.select(base, selection, [[target, p] for p in partners], results_dir,
                                         data_root=data_root or None, executor=executor)
    base.update(chosen.chosen)
    display(Markdown(validation_selection.describe(chosen)))
configs = grid(base, tasks=[[target, p] for p in partners], aggregator=["uniform"] + list(aggregators), seed=seeds)
study_specs = [other_settings.Study.from_dict(spec) for spec in studies]  # checked before anything trains
print(f"{len(configs)} runs: {len(partners)} task pairs x {1 + len(aggregators)} aggregators x {len(seeds)} seeds")

# %% tags=["remove-stderr", "hide-input"]
runs = load_runs(configs, results_dir, data_root=data_root or None, executor=executor)
runs = comparisons.label_configurations(runs, target, names)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")

# %% [markdown]
# ## Generalization of each task under each aggregator
# Mean test score of the 10 best-validation checkpoints, mean ± std over seeds.

# %% tags=["hide-input"]
summaries = comparisons.trajectory_summaries(runs)
labels = pd.DataFrame({"run": runs["run"].values, "pair": runs["configuration"].values, "aggregator": runs["aggregator"].values})
frame = summaries["generalization"].reset_coords(drop=True).to_dataframe().reset_index().merge(labels, on="run")
stats = frame.dropna(subset=["generalization"]).groupby(["pair", "task", "aggregator"])["generalization"].agg(["mean", "std"])
score_scale = 100.0 if described.task(target).primary.percent else 1.0  # rates in points, as the paper writes them
cells = [comparisons.mean_std(m, s, score_scale) for m, s in zip(stats["mean"], stats["std"])]
pivot = stats.assign(cell=cells)["cell"].unstack("aggregator")[["uniform", *aggregators]]
pivot.columns.name = f"generalization{' (points)' if score_scale == 100 else ''}, mean ± std over seeds"
display(pivot)

# %% [markdown]
# ## Figure 4: %Δ factor against %Δ generalization (SMTO − uniform)
# One point per (task pair or other setting, task, SMTO); filled when the generalization change is significant. The %Δ
# of generalization is signed so that positive is better.

# %% tags=["remove-stderr", "hide-input"]
changes = comparisons.smto_changes(summaries, runs["aggregator"], runs["configuration"])
# The paper's other settings that this profile ran: all their tasks together under each aggregator.
statuses = [other_settings.prepare(study, data_root or None, results_dir) for study in study_specs]
for status in [s for s in statuses if s.ran and s.study.aggregators != ()]:
    study_aggregators = list(aggregators if status.study.aggregators is None else status.study.aggregators)
    study_runs, _ = other_settings.run(status, results_dir, aggregators=study_aggregators, executor=executor)
    group = xr.DataArray([f"{status.study.display_name}: all tasks"] * study_runs.sizes["run"], dims="run")
    study_changes = comparisons.smto_changes(comparisons.trajectory_summaries(study_runs), study_runs["aggregator"], group)
    changes = pd.concat([changes, study_changes], ignore_index=True)
display(Markdown("Settings: " + "; ".join([f"{setting_name}: ran on the real data"] + [
    f"{s.study.display_name}: " + ("not run with SMTOs: the profile lists none for it" if s.ran and s.study.aggregators == ()
                                   else s.reason.split(chr(10))[0]) for s in statuses]) + "."))
finding = sections.quadrant_finding(changes, list(comparisons.FACTOR_SUMMARIES),
                                    expected_solely_agreeing=expected["factor_solely_in_agreeing_quadrants"],
                                    context=f"in this run ({profile} profile, {len(seeds)} seeds)")
factors = [agreement.factor for agreement in finding.agreements if agreement.measured]
fig = plots.quadrant_plot(changes, factors, title=f"{profile} profile: SMTOs vs the uniform gradient")
plots.publish(fig, "Figure 4 (paper A)", "%Δ of each factor (x; lower is better) against %Δ generalization (y; "
              "positive is better) of each SMTO over the uniform gradient, one point per (task pair or setting, task, "
              "SMTO); filled: the generalization change is significant. Shaded: the quadrants where optimization and "
              "generalization agree.", results_dir, "sec4_2-figure4")

# %% [markdown]
# The points of the figure: %Δ of each factor and of generalization, SMTO over uniform; ✱: the generalization
# change passes the ±2 std test.

# %% tags=["hide-input"]
points = changes.rename(columns={"group": "task pair", "aggregator": "SMTO"}).copy()
points["generalization"] = [f"{g:+.1f}" + (" ✱" if sig else "") for g, sig in zip(points["generalization"], points["significant"])]
points = points.drop(columns="significant")
display(points.style.format(precision=1).hide(axis="index"))

# %% [markdown]
# ## Does any factor have its significant points only in the agreeing quadrants?

# %% tags=["hide-input"]
display(Markdown(finding.text))

# %% tags=["hide-input"]
analysis_ds = changes.assign(significant=changes["significant"].astype(int)).to_xarray().rename(index="point")
analysis_ds.attrs.update(profile=profile, target=target, seeds=str(seeds), aggregators=",".join(aggregators),
                         expected=json.dumps(expected), finding=finding.answer,
                         other_settings=json.dumps({s.study.setting: s.reason.split(chr(10))[0] for s in statuses}),
                         **paper_claims.claims_attr([paper_claims.finding_claim("A4.2-smtos", finding)]))
save_atomic(analysis_ds, results_dir / "sec4_2_smtos.nc")
print("analysis written to sec4_2_smtos.nc in the results folder")
