"""Comparisons of run datasets (§3, §4) on hand-made trajectories with hand-computed answers."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mtlcore.analysis import comparisons


def test_labels_use_the_display_names_given():
    assert comparisons.configuration_label('["a"]', "a") == "STL"
    assert comparisons.configuration_label(["a", "b_task", "c"], "a") == "MTL: b_task + c"  # default: the task name
    assert comparisons.configuration_label(["a", "b_task"], "a", {"b_task": "Task B"}) == "MTL: Task B"
    runs = xr.Dataset(coords={"run": ["r0", "r1"], "tasks": ("run", ['["a"]', '["a", "b_task"]'])})
    labelled = comparisons.label_configurations(runs, "a", {"b_task": "Task B"})
    assert list(labelled["configuration"].values) == ["STL", "MTL: Task B"]


def _runs(values, labels):
    return (xr.DataArray(np.asarray(values, dtype=float), dims=["run"], coords={"run": [f"r{i}" for i in range(len(values))]}),
            xr.DataArray(labels, dims=["run"]))


def test_transfer_table():
    summary, labels = _runs([0.80, 0.82, 0.90, 0.92, 0.70, 0.72], ["STL", "STL", "A", "A", "B", "B"])
    table = comparisons.transfer_table(summary, labels)
    assert list(table.index) == ["STL", "A", "B"]
    assert table.loc["A", "delta"] == pytest.approx(0.10) and table.loc["B", "delta"] == pytest.approx(-0.10)
    assert table.loc["A", "std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert table.loc["A", "significant"] and table.loc["B", "significant"] and not table.loc["STL", "significant"]
    with pytest.raises(ValueError, match="no run labelled 'STL'"):
        comparisons.transfer_table(*_runs([1.0], ["A"]))


def test_gaps_at_loss_find_an_early_gap():
    # Same losses for everybody; configuration A is 0.1 better at every epoch, B is equal to STL.
    epochs = np.array([2.3, 1.0, 0.1, 0.01])
    loss = np.tile(epochs, (6, 1)) * (1 + 0.01 * np.arange(6))[:, None]
    base = np.array([0.1, 0.5, 0.7, 0.8])
    score = np.stack([base, base + 0.001, base + 0.1, base + 0.101, base, base + 0.001])
    labels = xr.DataArray(["STL", "STL", "A", "A", "B", "B"], dims=["run"])
    gaps = comparisons.gaps_at_loss(xr.DataArray(loss, dims=["run", "epoch"]), xr.DataArray(score, dims=["run", "epoch"]),
                                 labels, n_levels=3)
    a, b = gaps[gaps.configuration == "A"], gaps[gaps.configuration == "B"]
    assert len(a) == 3 and a["significant"].all() and np.allclose(a["delta"], 0.1, atol=0.002)
    assert not b["significant"].any()
    assert (a["x_final"] > 1).all()


def test_smto_changes_percent_and_significance():
    # two seeds each; aggregator A raises generalization of task t by 10% (significant), B leaves it alone
    runs = ["u0", "u1", "a0", "a1", "b0", "b1"]
    gen = np.array([0.50, 0.501, 0.55, 0.551, 0.50, 0.501])
    sharp = np.array([2.0, 2.0, 1.0, 1.0, 3.0, 3.0])
    summaries = xr.Dataset({name: (("run", "task"), v[:, None]) for name, v in
                            {"generalization": gen, "sharpness": sharp, "fisher_trace": sharp,
                             "grad_cov_trace": sharp, "min_train_loss": sharp}.items()},
                           coords={"run": runs, "task": ["t"]})
    agg = xr.DataArray(["uniform", "uniform", "A", "A", "B", "B"], dims=["run"])
    group = xr.DataArray(["g"] * 6, dims=["run"])
    changes = comparisons.smto_changes(summaries, agg, group).set_index("aggregator")
    assert changes.loc["A", "generalization"] == pytest.approx(100 * 0.05 / 0.5005)
    assert changes.loc["A", "sharpness"] == pytest.approx(-50.0) and changes.loc["B", "sharpness"] == pytest.approx(50.0)
    assert changes.loc["A", "significant"] and not changes.loc["B", "significant"]


def test_analysis_dataset_round_trips(tmp_path):
    summary, labels = _runs([0.8, 0.82, 0.9, 0.92], ["STL", "STL", "A", "A"])
    table = comparisons.transfer_table(summary, labels)
    gaps = pd.DataFrame([{"loss_level": 0.5, "x_final": 50.0, "configuration": "A", "reference": 0.5, "mean": 0.6,
                          "delta": 0.1, "significant": True}])
    ds = comparisons.analysis_dataset(summary, labels, table, gaps, {"profile": "test"})
    ds.to_netcdf(tmp_path / "a.nc", engine="h5netcdf")
    back = xr.open_dataset(tmp_path / "a.nc", engine="h5netcdf")
    assert float(back["transfer_delta"].sel(configuration="A")) == pytest.approx(0.1)
    assert list(back["run_configuration"].values) == ["STL", "STL", "A", "A"]


def test_gaps_at_loss_skip_the_untrained_checkpoint():
    # Every run follows the same score-against-loss curve once trained; STL reaches a lower loss at epoch 1.
    # Read between epoch 0 (chance) and epoch 1, STL's score would be a straight line from chance, below the
    # partner's real checkpoint: a spurious positive gap.
    curve = lambda loss: 0.9 - 0.3 * np.log10(loss)  # noqa: E731
    stl = np.array([2.3, 1.3, 0.5, 0.1, 0.02])
    mtl = np.array([2.3, 1.7, 0.5, 0.1, 0.02])
    loss = np.stack([stl * 1.001, stl, mtl * 1.001, mtl])
    score = np.where(np.arange(5) == 0, 0.1, curve(loss))
    dims = ["run", "epoch"]
    labels = xr.DataArray(["STL", "STL", "A", "A"], dims=["run"])
    gaps = comparisons.gaps_at_loss(xr.DataArray(loss, dims=dims), xr.DataArray(score, dims=dims), labels, n_levels=8)
    assert (gaps["loss_level"] < 1.3).all()
    np.testing.assert_allclose(gaps["delta"], 0.0, atol=1e-3)
    assert not gaps["significant"].any()
    with_untrained = comparisons.gaps_at_loss(xr.DataArray(loss, dims=dims), xr.DataArray(score, dims=dims), labels,
                                           n_levels=8, skip_first=0)
    assert with_untrained["significant"].any()  # the artefact the default avoids


def _factor_runs(every, epochs=40):
    """Two runs (STL, MTL) of one task; factors measured every `every` epochs and at epoch 0."""
    e = np.arange(epochs + 1)
    measured = e % every == 0
    sharp = np.where(measured, e.astype(float), np.nan)  # sharpness = epoch number: easy means
    sharp[0] = 1e6  # epoch 0 is the untrained model: never part of a summary
    val = np.where(e == 0, 1.0, e / 100)  # the untrained model has the "best" validation score
    data = {name: (("run", "epoch", "task"), np.stack([v, v])[:, :, None]) for name, v in
            {"sharpness": sharp, "fisher_trace": sharp, "grad_cov_trace": sharp, "train_loss": 1.0 / (1 + e),
             "val_score": val, "test_score": e / 100}.items()}
    return xr.Dataset(data, coords={"run": ["a", "b"], "epoch": e, "task": ["t"],
                                    "status": ("run", ["complete", "diverged"])})


@pytest.mark.parametrize("every, last, top", [(1, np.arange(21, 41).mean(), np.arange(21, 41).mean()),
                                              (10, 35.0, 35.0), (4, np.arange(24, 41, 4).mean(), np.arange(24, 41, 4).mean())])
def test_trajectory_summaries_cover_the_last_20_epochs_without_the_untrained_model(every, last, top):
    summaries = comparisons.trajectory_summaries(_factor_runs(every)).sel(task="t")
    assert float(summaries["sharpness"].sel(run="a")) == pytest.approx(last)
    assert float(summaries["fisher_trace"].sel(run="a")) == pytest.approx(top)
    assert float(summaries["generalization"].sel(run="a")) == pytest.approx(np.arange(31, 41).mean() / 100)
    assert float(summaries["min_train_loss"].sel(run="a")) == pytest.approx(1 / 41)
    assert summaries.sel(run="b").to_array().isnull().all()  # the diverged run counts nowhere


def test_delta_table_counts_only_runs_with_values():
    summary, labels = _runs([0.80, 0.82, np.nan, 0.90, 0.92, 0.91], ["STL", "STL", "STL", "A", "A", "A"])
    table = comparisons.delta_table(summary, labels)
    assert table.loc["STL", "seeds"] == 2 and table.loc["A", "seeds"] == 3


# --- the direction of a task's score ---------------------------------------------------------------------


def _error_runs():
    """STL and MTL (two seeds each) of a task "depth" whose score is an error (lower is better) and a task
    "acc" (higher is better). MTL lowers the depth error by 0.1 and raises the accuracy by 0.1."""
    epochs = np.arange(4)
    base_error = np.array([1.0, 0.5, 0.3, 0.4])  # best validation (lowest) at epoch 2
    base_acc = np.array([0.1, 0.5, 0.7, 0.6])  # best validation (highest) at epoch 2
    shift = np.array([0.0, 0.001, 0.1, 0.101])[:, None]
    error = base_error[None, :] - shift
    acc = base_acc[None, :] + shift
    score = np.stack([acc, error], axis=-1)  # run, epoch, task
    loss = np.broadcast_to(np.geomspace(2.0, 0.01, 4)[None, :, None], score.shape).copy()
    return xr.Dataset({"val_score": (("run", "epoch", "task"), score), "test_score": (("run", "epoch", "task"), score),
                       "train_loss": (("run", "epoch", "task"), loss)},
                      coords={"run": ["s0", "s1", "m0", "m1"], "epoch": epochs, "task": ["acc", "depth"],
                              "higher_is_better": ("task", [1, 0]),
                              "configuration": ("run", ["STL", "STL", "MTL", "MTL"])})


def test_generalization_picks_the_best_validation_checkpoint_in_the_task_direction():
    runs = _error_runs()
    summary = comparisons.generalization(runs["val_score"], runs["test_score"], k=1)
    assert float(summary.sel(run="s0", task="depth")) == pytest.approx(0.3)  # the lowest error, not the highest
    assert float(summary.sel(run="s0", task="acc")) == pytest.approx(0.7)
    assert list(summary["higher_is_better"].values) == [1, 0]  # kept for the Δ tables
    without = runs.drop_vars("higher_is_better")
    default = comparisons.generalization(without["val_score"], without["test_score"], k=1)
    assert float(default.sel(run="s0", task="depth")) == pytest.approx(0.5)  # absent: higher is better


def test_positive_transfer_means_better_for_a_lower_is_better_score():
    runs = _error_runs().sel(task="depth")
    summary = comparisons.generalization(runs["val_score"], runs["test_score"], k=1)
    table = comparisons.transfer_table(summary, runs["configuration"])
    assert table.loc["MTL", "mean"] == pytest.approx(0.3 - 0.1005)  # in the score's own units
    assert table.loc["MTL", "delta"] == pytest.approx(0.1) and table.loc["MTL", "significant"]  # lower error: positive
    accuracy = _error_runs().sel(task="acc")
    acc_table = comparisons.transfer_table(comparisons.generalization(accuracy["val_score"], accuracy["test_score"], k=1),
                                           accuracy["configuration"])
    assert acc_table.loc["MTL", "delta"] == pytest.approx(0.1)


def test_delta_table_orients_the_score_but_not_the_factors():
    runs = _error_runs().sel(task="depth")
    summaries = xr.Dataset({"generalization": comparisons.generalization(runs["val_score"], runs["test_score"], k=1),
                            "sharpness": ("run", [2.0, 2.01, 1.0, 1.01])})
    table = comparisons.delta_table(summaries, runs["configuration"])
    assert table.loc["MTL", "delta_generalization"] == pytest.approx(0.1)
    assert table.loc["MTL", "delta_sharpness"] == pytest.approx(-1.0)  # MTL − STL, lower is better


def test_delta_table_refuses_tasks_of_mixed_directions():
    runs = _error_runs()
    summary = comparisons.generalization(runs["val_score"], runs["test_score"], k=1)
    with pytest.raises(ValueError, match="mix higher- and lower-is-better"):
        comparisons.transfer_table(summary, runs["configuration"])


def test_gaps_at_loss_are_oriented_by_the_score_direction():
    runs = _error_runs().sel(task="depth")
    gaps = comparisons.gaps_at_loss(runs["train_loss"], runs["test_score"], runs["configuration"], n_levels=2)
    assert len(gaps) == 2 and (gaps["delta"] > 0.05).all() and gaps["significant"].all()
    assert (gaps["mean"] < gaps["reference"]).all()  # the raw errors: MTL's is lower
    forced = comparisons.gaps_at_loss(runs["train_loss"], runs["test_score"], runs["configuration"], n_levels=2,
                                      higher_is_better=True)
    np.testing.assert_allclose(forced["delta"], -gaps["delta"])


def test_smto_changes_orient_generalization_per_task():
    # the SMTO lowers the error of "depth" by 10% and its sharpness by 50%; "acc" does not move
    summaries = xr.Dataset({"generalization": (("run", "task"), [[0.5, 0.20], [0.501, 0.2002], [0.5, 0.18], [0.501, 0.1802]]),
                            **{name: (("run", "task"), [[2.0, 2.0], [2.0, 2.0], [2.0, 1.0], [2.0, 1.0]])
                               for name in comparisons.FACTOR_SUMMARIES}},
                           coords={"run": ["u0", "u1", "a0", "a1"], "task": ["acc", "depth"], "higher_is_better": ("task", [1, 0])})
    agg = xr.DataArray(["uniform", "uniform", "A", "A"], dims=["run"])
    changes = comparisons.smto_changes(summaries, agg, xr.DataArray(["g"] * 4, dims=["run"])).set_index("task")
    assert changes.loc["depth", "generalization"] == pytest.approx(100 * 0.02 / 0.2001)  # lower error: positive
    assert changes.loc["depth", "sharpness"] == pytest.approx(-50.0)  # factors are not flipped
    assert changes.loc["depth", "significant"] and not changes.loc["acc", "significant"]
    assert changes.loc["acc", "generalization"] == pytest.approx(0.0)


def test_gaps_keep_their_columns_without_a_common_level():
    loss = xr.DataArray([[2.0, 1.5, 1.0], [0.5, 0.2, 0.1]], dims=["run", "epoch"])
    gaps = comparisons.gaps_at_loss(loss, loss, xr.DataArray(["STL", "A"], dims=["run"]))
    assert gaps.empty and list(gaps.columns) == comparisons.GAP_COLUMNS


# --- factors and their run variables ----------------------------------------------------------------------


def test_table1_variables_come_from_the_factors_variables():
    from mtlcore.metrics.schedule import VARIABLES

    assert all(variable in VARIABLES[factor] for factor, variable in comparisons.TABLE1_VARIABLES.items())
    assert comparisons.table1_variables(["coherence", "sharpness", "conflict", "fisher_trace"]) == \
        ["grad_cov_trace", "sharpness", "fisher_trace"]  # conflict has no STL counterpart
    assert set(comparisons.TABLE1_VARIABLES.values()) <= set(comparisons.FACTOR_SUMMARIES)  # each has a summary
    with pytest.raises(ValueError, match="unknown factor"):
        comparisons.table1_variables(["sharpnes"])
