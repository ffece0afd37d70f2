"""§3 analysis on hand-made trajectories with hand-computed answers."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mtlcore import transfer


def test_labels():
    assert transfer.configuration_label('["fashion1"]', "fashion1") == "STL"
    assert transfer.configuration_label(["fashion1", "noisy_fashion"], "fashion1") == "MTL: NoisyFashion"


def test_value_at_loss_interpolates_in_log_loss():
    loss = np.array([1.0, 0.1, 0.01])
    score = np.array([0.2, 0.6, 0.8])
    assert transfer.value_at_loss(loss, score, 0.1) == pytest.approx(0.6)
    # sqrt(0.1 * 0.01) lies half way between epochs 1 and 2 in log loss
    assert transfer.value_at_loss(loss, score, np.sqrt(0.001)) == pytest.approx(0.7)
    assert np.isnan(transfer.value_at_loss(loss, score, 0.001))  # never reached


def test_common_levels_lie_inside_every_trajectory():
    loss = np.array([[2.0, 0.5, 0.01], [2.5, 1.0, 0.1]])
    levels = transfer.common_loss_levels(loss, 3)
    assert len(levels) == 3 and (levels < 2.0).all() and (levels > 0.1).all()
    np.testing.assert_allclose(np.diff(np.log(levels)), np.log(0.1 / 2.0) / 4)  # geometric spacing


def _runs(values, labels):
    return (xr.DataArray(np.asarray(values, dtype=float), dims=["run"], coords={"run": [f"r{i}" for i in range(len(values))]}),
            xr.DataArray(labels, dims=["run"]))


def test_transfer_table():
    summary, labels = _runs([0.80, 0.82, 0.90, 0.92, 0.70, 0.72], ["STL", "STL", "A", "A", "B", "B"])
    table = transfer.transfer_table(summary, labels)
    assert list(table.index) == ["STL", "A", "B"]
    assert table.loc["A", "delta"] == pytest.approx(0.10) and table.loc["B", "delta"] == pytest.approx(-0.10)
    assert table.loc["A", "std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert table.loc["A", "significant"] and table.loc["B", "significant"] and not table.loc["STL", "significant"]
    with pytest.raises(ValueError, match="no run labelled 'STL'"):
        transfer.transfer_table(*_runs([1.0], ["A"]))


def test_gaps_at_loss_find_an_early_gap():
    # Same losses for everybody; configuration A is 0.1 better at every epoch, B is equal to STL.
    epochs = np.array([2.3, 1.0, 0.1, 0.01])
    loss = np.tile(epochs, (6, 1)) * (1 + 0.01 * np.arange(6))[:, None]
    base = np.array([0.1, 0.5, 0.7, 0.8])
    score = np.stack([base, base + 0.001, base + 0.1, base + 0.101, base, base + 0.001])
    labels = xr.DataArray(["STL", "STL", "A", "A", "B", "B"], dims=["run"])
    gaps = transfer.gaps_at_loss(xr.DataArray(loss, dims=["run", "epoch"]), xr.DataArray(score, dims=["run", "epoch"]),
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
    changes = transfer.smto_changes(summaries, agg, group).set_index("aggregator")
    assert changes.loc["A", "generalization"] == pytest.approx(100 * 0.05 / 0.5005)
    assert changes.loc["A", "sharpness"] == pytest.approx(-50.0) and changes.loc["B", "sharpness"] == pytest.approx(50.0)
    assert changes.loc["A", "significant"] and not changes.loc["B", "significant"]


def test_analysis_dataset_round_trips(tmp_path):
    from mtlcore.results import save_atomic

    summary, labels = _runs([0.8, 0.82, 0.9, 0.92], ["STL", "STL", "A", "A"])
    table = transfer.transfer_table(summary, labels)
    gaps = pd.DataFrame([{"loss_level": 0.5, "x_final": 50.0, "configuration": "A", "reference": 0.5, "mean": 0.6,
                          "delta": 0.1, "significant": True}])
    ds = transfer.analysis_dataset(summary, labels, table, gaps, {"profile": "test"})
    save_atomic(ds, tmp_path / "a.nc")
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
    gaps = transfer.gaps_at_loss(xr.DataArray(loss, dims=dims), xr.DataArray(score, dims=dims), labels, n_levels=8)
    assert (gaps["loss_level"] < 1.3).all()
    np.testing.assert_allclose(gaps["delta"], 0.0, atol=1e-3)
    assert not gaps["significant"].any()
    with_untrained = transfer.gaps_at_loss(xr.DataArray(loss, dims=dims), xr.DataArray(score, dims=dims), labels,
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
    summaries = transfer.trajectory_summaries(_factor_runs(every)).sel(task="t")
    assert float(summaries["sharpness"].sel(run="a")) == pytest.approx(last)
    assert float(summaries["fisher_trace"].sel(run="a")) == pytest.approx(top)
    assert float(summaries["generalization"].sel(run="a")) == pytest.approx(np.arange(31, 41).mean() / 100)
    assert float(summaries["min_train_loss"].sel(run="a")) == pytest.approx(1 / 41)
    assert summaries.sel(run="b").to_array().isnull().all()  # the diverged run counts nowhere


def test_delta_table_counts_only_runs_with_values():
    summary, labels = _runs([0.80, 0.82, np.nan, 0.90, 0.92, 0.91], ["STL", "STL", "STL", "A", "A", "A"])
    table = transfer.delta_table(summary, labels)
    assert table.loc["STL", "seeds"] == 2 and table.loc["A", "seeds"] == 3
