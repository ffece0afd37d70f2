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
# # §3 Transfer appears early, as a gap at comparable training loss
#
# The paper's first finding (its Figure 1): in the FashionMTL setting, training Fashion1 together with
# more Fashion-MNIST data (Fashion2) helps its test accuracy, training it with label noise
# (NoisyFashion) hurts it, and the difference shows up **early**, as a gap in generalization between
# trajectories that have reached the same training loss, long before the training loss is minimised.
#
# Below, the target task is trained alone (STL) and with each partner (MTL, uniform multi-task gradient)
# over several seeds; every epoch records the target's full training loss and its test score. The
# paper's expected sign of each partner's transfer is the `expected` parameter. The last part of the
# chapter does the same for the paper's other settings that this profile runs: every task of the setting
# trained together against each target task alone.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_mtl"
setting_options = {"train_size": 2000, "val_size": 500, "test_size": 500, "data_seed": 0}
target = "fashion1"
partners = ["fashion2", "noisy_fashion", "notmnist"]
expected = {"fashion2": "positive", "noisy_fashion": "negative", "notmnist": "either"}
seeds = [0, 1]
epochs = 3
optimizer = "momentum"
lr = 0.01
batch_size = 128
loss_scale = "sum"
model = "lenet"
model_options = {"dropout": 0.5}
metrics = {}
selection = {}  # e.g. {"grid": {"lr": [0.01, 0.001]}, "seeds": [0]}: choose those values on validation first
studies = []  # the other settings: one mapping each (see mtlcore.analysis.studies)
device = "auto"
# where runs train; empty: what mtlcore batch was given (--executor), else sequential
executor = ""

# %% tags=["hide-input"]
import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
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
task_sets = [[target]] + [[target, partner] for partner in partners]
study_specs = [other_settings.Study.from_dict(spec) for spec in studies]  # checked before anything trains

# %% [markdown]
# ## The training configuration, chosen on validation
# The paper selects the learning rate, batch size and optimizer on validation from a sweep before training
# its seeds (Appendix A). Where this profile gives a grid, every grid point is trained on the selection
# seeds for every configuration below, each (configuration, task, seed) ranks the points by its best
# validation score, and the point with the lowest mean rank is used for everything that follows.

# %% tags=["remove-stderr", "hide-input"]
if selection:
    chosen = validation_selection.select(base, selection, task_sets, results_dir, data_root=data_root or None,
                                         executor=executor)
    base.update(chosen.chosen)
    display(Markdown(validation_selection.describe(chosen)))
    display(chosen.table.style.format(precision=4).hide(axis="index"))
else:
    display(Markdown("This profile gives no grid: the configuration is the profile's own "
                     f"(optimizer {optimizer}, lr {lr}, batch {batch_size})."))
configs = grid(base, tasks=task_sets, seed=seeds)
print(f"{len(configs)} runs: {len(task_sets)} configurations x {len(seeds)} seeds")

# %% tags=["remove-stderr", "hide-input"]
runs = load_runs(configs, results_dir, data_root=data_root or None, executor=executor)
runs = comparisons.label_configurations(runs, target, names)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")

# %% [markdown]
# ## Figure 1: the target's test score against its training loss
# One curve per configuration: at each epoch, the geometric mean over seeds of the full training loss
# (x, log scale, decreasing to the right as training goes on) and the mean test score (y), with a
# band of ±2 standard deviations over seeds. Left: the whole trajectory; right: the same curves over the
# second half of training, where the configurations separate.

# %% tags=["hide-input"]
target_runs = runs.sel(task=target)
order = ["STL"] + [comparisons.configuration_label([target, p], target, names) for p in partners]
target_name = names.get(target, target)
score_name = str(target_runs["primary_score"].values)  # the target's primary score (e.g. accuracy)
fig, (ax_all, ax_late) = plt.subplots(1, 2, figsize=(12, 4.2))
for ax, options in ((ax_all, {"title": f"{setting_name} ({profile} profile): {target_name}"}),
                    (ax_late, {"legend": False, "zoom_last": 0.5, "title": "second half of training (zoom)"})):
    plots.generalization_vs_loss(target_runs, group="configuration", order=order, ax=ax,
                                 ylabel=f"{target_name} test {score_name}", **options)
plots.publish(fig, "Figure 1 (paper A)", f"{target_name}'s test {score_name} against its training loss, trained alone "
              f"(STL) and with each partner (MTL), mean ± 2 std over {len(seeds)} seeds; the loss axis decreases to the "
              "right, and the right panel zooms on the second half of training.", results_dir, "sec3-figure1")

# %% [markdown]
# ## Final transfer
# Generalization of a trajectory = mean test score of its 10 best-validation trained checkpoints
# (the paper's Appendix B.4; runs that diverged are left out). Transfer Δ = mean over seeds of MTL − mean
# of STL, signed so that a positive Δ is better (for a lower-is-better score, STL − MTL); significant
# when the ±2 std intervals do not overlap.

# %% tags=["hide-input"]
summary = comparisons.generalization(target_runs["val_score"], target_runs["test_score"], k=10)
table = comparisons.transfer_table(summary, target_runs["configuration"], reference="STL")
score_scale = 100.0 if described.task(target).primary.percent else 1.0  # rates in points, as the paper writes them
display(Markdown("✱: significant (the ±2 std intervals over seeds do not overlap); numbers rounded to what the "
                 "seeds resolve."))
display(comparisons.readable_transfer_table(table, score_name, score_scale))

# %% [markdown]
# ## Is the gap there early, at comparable training loss?
# Each trajectory's test score is read off (log-linear interpolation) at common training-loss levels
# that every trajectory passes through after its first epoch, from the highest loss they all share down
# to the lowest. The untrained model is left out: between it and epoch 1 the score jumps from chance,
# and a straight line across that jump is no trajectory.
# "× final" is how far the level lies above the STL run's final training loss.

# %% tags=["hide-input"]
gaps = comparisons.gaps_at_loss(target_runs["train_loss"], target_runs["test_score"], target_runs["configuration"],
                                reference="STL", n_levels=6)
shown = gaps.assign(cell=[f"{d * score_scale:+.2f}" + (" ✱" if s else "") for d, s in zip(gaps["delta"], gaps["significant"])],
                    reference=[f"{r * score_scale:.2f}" for r in gaps["reference"]], x_final=gaps["x_final"].round(1),
                    loss_level=[float(f"{v:.3g}") for v in gaps["loss_level"]])
shown = shown.rename(columns={"loss_level": "training loss", "x_final": "× STL's final loss",
                              "reference": f"STL's test {score_name}"})
shown = shown.pivot_table(index=["training loss", "× STL's final loss", f"STL's test {score_name}"],
                          columns="configuration", values="cell", aggfunc="first")
if len(gaps):
    display(Markdown(f"Δ test {score_name}{' (points)' if score_scale == 100 else ''} against STL at each common "
                     "training loss (positive: better; ✱: significant, ±2 std)."))
    display(shown.sort_index(ascending=False))
else:
    display(Markdown(f"No gap at comparable loss can be read here: after their first epoch the trajectories share no "
                     f"training-loss range (runs of {epochs} epoch{'s' if epochs != 1 else ''}). Train more epochs."))

# %% [markdown]
# ## Does the paper's finding hold in this run?

# %% tags=["hide-input"]
expected_by_configuration = {comparisons.configuration_label([target, p], target, names): sign
                             for p, sign in expected.items() if p in partners}
finding = sections.transfer_finding(table, gaps, expected_by_configuration,
                                    context=f"in this run ({profile} profile, {len(seeds)} seeds)")
display(Markdown(finding.text))

# %% [markdown]
# ## The other settings: every task together against each task alone
# Paper A's Table 1 compares, in CIFAR-100, CelebA, Cityscapes and GLUE, each task trained alone (STL)
# with all the setting's tasks trained together (MTL), over seeds; the generalization of a trajectory and
# the significance test are those of the final transfer above. Which settings this profile ran, and why the
# others were not run:

# %% tags=["hide-input"]
statuses = [other_settings.prepare(study, data_root or None, results_dir) for study in study_specs]
display(Markdown(other_settings.overview_markdown(  # with the files to get for each study that lacked them
    statuses, fashion_mtl=f"ran on the real data: {names.get(target, target)} with each partner (above)")))

# %% tags=["remove-stderr", "hide-input"]
study_tables = {}
for status in [s for s in statuses if s.ran]:
    study = status.study
    display(Markdown(f"### {study.display_name}\n{study.display_name} {status.reason}: {len(study.tasks)} tasks "
                     f"together, {len(study.targets)} of them also alone, seeds {list(study.seeds)}."))
    study_runs, study_selection = other_settings.run(status, results_dir, executor=executor)
    if study_selection:
        display(Markdown(validation_selection.describe(study_selection)))
        display(study_selection.table.style.format(precision=4).hide(axis="index"))
    print("diverged runs (left out of every summary):", diverged_runs(study_runs) or "none")
    study_table = study_tables[study.setting] = other_settings.target_table(study_runs, study)
    shown = other_settings.shown_table(study_table, study)
    display(Markdown("Generalization (mean ± std over seeds; rates in points), Δ = MTL − STL (positive: better; "
                     "✱ significant, ±2 std), and paper A's Δ (Table 1) where it gives one and the run used the real data."))
    display(shown)
    figure = plots.transfer_by_task(study_table, list(shown.index), other_settings.display_scale(study, study_table.index),
                                    title=f"{study.display_name} ({profile} profile): transfer to each task")
    plots.publish(figure, f"Figure §3.{study.setting}.a (Table 1 of paper A, drawn)",
                  f"{study.display_name}: Δ generalization (MTL − STL, positive: better) of each task, whiskers "
                  "2(σ_MTL + σ_STL), which cross zero exactly when Δ is not significant; diamonds: paper A's Δ.",
                  results_dir, f"sec3-{study.setting}-delta")
    drawn = other_settings.curve_targets(study_table)
    display(Markdown(f"Test score against training loss, STL and MTL (mean ± 2 std over seeds), of "
                     f"{'every target' if len(drawn) == len(study.targets) else f'{len(drawn)} targets (significant transfer first)'}."))
    study_names = settings.get(study.setting).display_names
    figure = plots.generalization_grid(
        [(study_names.get(t, t), other_settings.target_runs(study_runs, study, t)) for t in drawn],
        group="configuration", order=["STL", "MTL"],
        title=f"{study.display_name} ({profile} profile): generalization against training loss")
    plots.publish(figure, f"Figure §3.{study.setting}.b (Figure 1 of paper A, for {study.display_name})",
                  "Test score against training loss of each target, STL and MTL, mean ± 2 std over seeds.",
                  results_dir, f"sec3-{study.setting}-curves")

# %% tags=["hide-input"]
analysis_ds = comparisons.analysis_dataset(
    summary, target_runs["configuration"], table, gaps,
    attrs={"profile": profile, "target": target, "seeds": str(seeds), "runs": ",".join(map(str, runs["run"].values)),
           "expected": json.dumps(expected), "finding": finding.answer,
           "other_settings": json.dumps({s.study.setting: s.reason.split(chr(10))[0] for s in statuses}),
           **paper_claims.claims_attr(paper_claims.transfer_claims(finding))})
for status in [s for s in statuses if s.ran]:
    analysis_ds = analysis_ds.merge(other_settings.table_dataset(study_tables[status.study.setting], status.study))
save_atomic(analysis_ds, results_dir / "sec3_transfer.nc")
print("analysis written to sec3_transfer.nc in the results folder")
