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
# SMTOs (here MGDA, PCGrad and GradNorm) change the multi-task update. If their effect on
# generalization came through one of the trajectory factors, the %Δ of that factor against the uniform
# multi-task gradient would predict the %Δ of generalization: points would fall in the shaded
# quadrants only (better optimisation and better generalization, top left; worse and worse, bottom
# right). The counterpart of the paper's Figure 4, with minimum training loss as a fourth factor.

# %% tags=["parameters", "remove-cell"]
profile = "adhoc"
results_dir = "../results/adhoc"
data_root = ""
setting = "fashion_mtl"
setting_options = {"train_size": 1000, "val_size": 200, "test_size": 200, "data_seed": 0}
target = "fashion1"
partners = ["fashion2", "noisy_fashion"]
aggregators = ["mgda", "pcgrad", "gradnorm"]
seeds = [0, 1]
epochs = 3
optimizer = "momentum"
lr = 0.01
batch_size = 128
loss_scale = "sum"
dropout = 0.5
metrics = {"factors": ["sharpness", "fisher_trace", "coherence"], "examples": 512}
device = "auto"
executor = "local"

# %%
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from mtlcore import plots, transfer
from mtlcore.results import save_atomic
from mtlcore.runner import base_config, diverged_runs, grid, load_runs

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
base = base_config(globals())  # the run-config parameters of this notebook
configs = grid(base, tasks=[[target, p] for p in partners], aggregator=["uniform"] + list(aggregators), seed=seeds)
print(f"{len(configs)} runs: {len(partners)} task pairs x {1 + len(aggregators)} aggregators x {len(seeds)} seeds")

# %% tags=["remove-stderr"]
runs = transfer.label_configurations(load_runs(configs, results_dir, data_root=data_root or None, executor=executor), target)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")

# %% [markdown]
# ## Generalization of each task under each aggregator
# Mean test accuracy of the 10 best-validation checkpoints, mean ± std over seeds.

# %%
summaries = transfer.trajectory_summaries(runs)
labels = pd.DataFrame({"run": runs["run"].values, "pair": runs["configuration"].values, "aggregator": runs["aggregator"].values})
frame = summaries["generalization"].reset_coords(drop=True).to_dataframe().reset_index().merge(labels, on="run")
pivot = frame.dropna(subset=["generalization"]).groupby(["pair", "task", "aggregator"])["generalization"].agg(["mean", "std"]).unstack("aggregator")
display(pivot.style.format(precision=4))

# %% [markdown]
# ## Figure 4: %Δ factor against %Δ generalization (SMTO − uniform)
# One point per (task pair, task, SMTO); filled when the generalization change is significant.

# %%
changes = transfer.smto_changes(summaries, runs["aggregator"], runs["configuration"])
factors = [f for f in ("sharpness", "fisher_trace", "grad_cov_trace", "min_train_loss")
           if np.isfinite(changes[f]).any()]
fig = plots.quadrant_plot(changes, factors, title=f"FashionMTL ({profile} profile): SMTOs vs the uniform gradient")

# %% [markdown]
# The points of the figure (%Δ; `significant`: the generalization change passes the ±2 std test).

# %%
display(changes.style.format(precision=2))

# %% tags=["hide-input"]
def agreeing(frame, factor):
    x, y = frame[factor], frame["generalization"]
    return ((x < 0) & (y > 0)) | ((x > 0) & (y < 0))


lines = []
for factor in factors:
    inside = agreeing(changes, factor)
    significant = changes["significant"]
    lines.append(f"- **{factor.replace('_', ' ')}**: {int(inside.sum())} of {len(changes)} points in the agreeing quadrants "
                 f"({int((inside & significant).sum())} of {int(significant.sum())} significant ones).")
significant_points = int(changes["significant"].sum())
all_inside = [f for f in factors if significant_points and agreeing(changes[changes["significant"]], f).all()]
if not significant_points:
    headline = ("**No SMTO changed generalization significantly** in this run, so no factor can be tested "
                "against the quadrants")
else:
    headline = (f"**{'Some factor' if all_inside else 'No factor'}** has its significant points only in the agreeing "
                f"quadrants{': ' + ', '.join(all_inside) if all_inside else ''}; this rests on {significant_points} "
                f"significant point{'s' if significant_points > 1 else ''} of {len(changes)}")
display(Markdown(
    f"{headline} ({profile} profile, {len(seeds)} seeds). "
    "The paper finds no factor whose points lie solely there.\n\n" + "\n".join(lines)))

# %% tags=["hide-input"]
analysis_ds = changes.assign(significant=changes["significant"].astype(int)).to_xarray().rename(index="point")
analysis_ds.attrs.update(profile=profile, target=target, seeds=str(seeds), aggregators=",".join(aggregators))
save_atomic(analysis_ds, results_dir / "sec4_2_smtos.nc")
print(f"analysis written to {results_dir / 'sec4_2_smtos.nc'}")
