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
# single-task trajectories: **sharpness** (worst-case adaptive ℓ∞ m-sharpness), the **trace of the
# Fisher information** (its early explosion), and **gradient coherence** (the trace of the gradient
# covariance). If one of them explained transfer, MTL with the helpful partner (Fashion2) would be
# better on it than STL, and MTL with the harmful partner (NoisyFashion) worse (lower is better for all
# three). This chapter draws the counterparts of Figure 3 and Table 1 for FashionMTL.

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
dropout = 0.5
metrics = {"factors": ["sharpness", "fisher_trace", "coherence"], "examples": 512}
device = "auto"
executor = "local"

# %%
import logging
from pathlib import Path

import numpy as np
from IPython.display import Markdown, display

from mtlcore import plots, transfer
from mtlcore.results import save_atomic
from mtlcore.runner import base_config, diverged_runs, grid, load_runs

logging.basicConfig(level=logging.WARNING)
results_dir = Path(results_dir)
base = base_config(globals())  # the run-config parameters of this notebook
configs = grid(base, tasks=[[target]] + [[target, p] for p in partners], seed=seeds)
print(f"{len(configs)} runs; factors {metrics['factors']} on the first {metrics.get('examples', 2048)} "
      f"training examples, every {metrics.get('every', 1)} epoch(s)")

# %% tags=["remove-stderr"]
runs = transfer.label_configurations(load_runs(configs, results_dir, data_root=data_root or None, executor=executor), target)
print("diverged runs (left out of every summary):", diverged_runs(runs) or "none")
target_runs = runs.sel(task=target)
order = ["STL"] + [transfer.configuration_label([target, p], target) for p in partners]

# %% [markdown]
# ## Figure 3: each factor of the target task against its training loss
# Mean ± 2 std over seeds at every measured epoch; the loss axis decreases to the right.

# %%
factor_variables = [v for f in metrics["factors"] for v in {"sharpness": ["sharpness"], "fisher_trace": ["fisher_trace"],
                                                            "coherence": ["grad_cov_trace"]}.get(f, [])]
fig = plots.factors_vs_loss(target_runs, factor_variables, group="configuration", order=order,
                            title=f"FashionMTL ({profile} profile): factors of {target}")

# %% [markdown]
# ## Table 1: Δ = MTL − STL
# One number per trajectory (REFERENCE §1.4): generalization E = mean test accuracy of the 10
# best-validation checkpoints; sharpness and coherence = mean over the last 20 epochs' checkpoints; FIM
# = mean of the largest values, as many as 20 epochs hold (with factors measured every n-th epoch: the
# last or largest ceil(20/n)). The untrained model (epoch 0) and runs that diverged are left out. ✱ marks
# a significant Δ (the ±2 std intervals over seeds do not overlap).

# %%
summaries = transfer.trajectory_summaries(target_runs)
quantities = ["generalization"] + [q for q in ("sharpness", "fisher_trace", "grad_cov_trace") if q in factor_variables]
table = transfer.delta_table(summaries[quantities], target_runs["configuration"])


def marked(row, q):
    return f"{row[f'delta_{q}']:+.4g}" + (" ✱" if row[f"significant_{q}"] else "")


shown = table.drop(index="STL").apply(lambda row: {f"Δ {q}": marked(row, q) for q in quantities}, axis=1, result_type="expand")
display(shown)

# %% [markdown]
# ## Does any factor explain both the positive and the negative transfer?

# %% tags=["hide-input"]
def explains(q: str) -> tuple[bool, str]:
    """A factor explains transfer if MTL moves it the 'good' way (down) where transfer is positive and the
    'bad' way (up) where it is negative, significantly in both cases."""
    verdicts = []
    for label in table.index.drop("STL"):
        row = table.loc[label]
        if not row["significant_generalization"]:
            continue
        sign_e, sign_q = np.sign(row["delta_generalization"]), np.sign(row[f"delta_{q}"])
        verdicts.append((label, bool(row[f"significant_{q}"] and sign_q == -sign_e)))
    ok = len(verdicts) >= 2 and all(v for _, v in verdicts) and any(table.loc[l, "delta_generalization"] > 0 for l, _ in verdicts) \
        and any(table.loc[l, "delta_generalization"] < 0 for l, _ in verdicts)
    return ok, ", ".join(f"{l}: {'consistent' if v else 'not consistent'}" for l, v in verdicts) or "no significant transfer to explain"


verdicts = {q: explains(q) for q in quantities[1:]}
lines = [f"- **{q}**: {'explains' if ok else 'does not explain'} both directions ({detail})."
         for q, (ok, detail) in verdicts.items()]
transfer_rows = table.drop(index="STL")
significant = transfer_rows[transfer_rows["significant_generalization"]]
positive = list(significant.index[significant["delta_generalization"] > 0])
negative = list(significant.index[significant["delta_generalization"] < 0])
run_text = f"in this run ({profile} profile, {len(seeds)} seeds)"
if positive and negative:
    any_ok = any(ok for ok, _ in verdicts.values())
    headline = (f"**{'Yes' if any_ok else 'No'}**: {run_text} "
                f"{'a factor moves with the transfer in both directions' if any_ok else 'no factor moves with the transfer in both directions'}. "
                "The paper finds no factor that explains both (Table 1).")
else:
    headline = (f"**Cannot be tested** {run_text}: the question needs a significant positive and a significant "
                f"negative transfer, and here the significant ones are: positive {', '.join(positive) or 'none'}; "
                f"negative {', '.join(negative) or 'none'}. The paper finds no factor that explains both (Table 1); "
                "this run neither confirms nor contradicts that.")
display(Markdown(headline + "\n\n" + "\n".join(lines)))

# %% tags=["hide-input"]
analysis_ds = summaries.assign_coords(run_configuration=("run", [str(v) for v in target_runs["configuration"].values]))
analysis_ds = analysis_ds.drop_vars([c for c in analysis_ds.coords if c not in ("run", "run_configuration")])
analysis_ds = analysis_ds.merge(transfer.table_dataset(table, "table1"))
analysis_ds.attrs.update(profile=profile, target=target, seeds=str(seeds), factors=",".join(metrics["factors"]))
save_atomic(analysis_ds, results_dir / "sec4_1_factors.nc")
print(f"analysis written to {results_dir / 'sec4_1_factors.nc'}")
