"""Analysis functions on hand-made trajectories with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from mtlcore.analysis import trajectories

NAN = float("nan")


def test_loss_bins_are_geometric_over_the_measured_positive_range():
    edges = trajectories.loss_bins([1000.0, NAN, 10.0, 1.0, 0.0], n_bins=3)
    np.testing.assert_allclose(edges, [1.0, 10.0, 100.0, 1000.0])
    assert edges[0] == 1.0 and edges[-1] == 1000.0
    with pytest.raises(ValueError, match="no positive finite loss"):
        trajectories.loss_bins([NAN, 0.0])


def test_bin_trajectory_means_per_bin_skipping_unmeasured_values():
    loss = [1000.0, 500.0, 50.0, 20.0, 5.0, 1.0]
    values = [1.0, 3.0, 10.0, NAN, 7.0, 9.0]
    means = trajectories.bin_trajectory(loss, values, [1.0, 10.0, 100.0, 1000.0])
    # Bin [1, 10): 5 → 7 and 1 → 9; bin [10, 100): 50 → 10 (20 unmeasured); bin [100, 1000]: 1 and 3.
    np.testing.assert_allclose(means, [8.0, 10.0, 2.0])
    empty = trajectories.bin_trajectory([5.0], [1.0], [1.0, 2.0, 10.0])
    assert math.isnan(empty[0]) and empty[1] == 1.0


def test_band_mean_includes_both_ends():
    assert trajectories.band_mean([1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 3.0, 4.0], (2.0, 4.0)) == 2.5


def test_early_phase_band_skips_the_highest_loss_bins():
    losses = np.geomspace(1e4, 1.0, 9)  # edges of 4 bins: 1, 10, 100, 1000, 10000
    assert trajectories.early_phase_band(losses, n_bins=4, skip_highest=1, width=2) == pytest.approx((10.0, 1000.0))
    assert trajectories.early_phase_band(losses, n_bins=4, skip_highest=0, width=1) == pytest.approx((1000.0, 1e4))
    with pytest.raises(ValueError, match="skip_highest"):
        trajectories.early_phase_band(losses, n_bins=4, skip_highest=2, width=3)


def test_end_of_training_band_is_set_by_the_highest_minimum_loss():
    single_task = [100.0, 1.0, 0.01]  # converges further
    multi_task = [100.0, 10.0, 1.0]  # highest minimum: its bins over [1, 100]
    band = trajectories.end_of_training_band([single_task, multi_task], n_bins=2, width=1)
    assert band == pytest.approx((1.0, 10.0))
    assert trajectories.band_mean(single_task, [5.0, 6.0, 7.0], band) == 6.0


def test_best_validation_mean_uses_the_k_best_measured_checkpoints():
    val = [0.1, 0.9, NAN, 0.8, 0.5, 0.9]
    test = [1.0, 2.0, 100.0, 3.0, 4.0, 5.0]
    assert trajectories.best_validation_mean(val, test, k=2) == 3.5  # the two 0.9 checkpoints
    assert trajectories.best_validation_mean(val, test, k=3) == pytest.approx(10 / 3)
    assert trajectories.best_validation_mean(val, test, k=1, higher_is_better=False) == 1.0
    assert trajectories.best_validation_mean(val, test, k=50) == pytest.approx(3.0)  # all measured
    assert math.isnan(trajectories.best_validation_mean([NAN], [1.0]))


def test_last_and_top_means_skip_unmeasured_checkpoints():
    values = [5.0, NAN, 1.0, 4.0, NAN, 2.0]
    assert trajectories.last_mean(values, k=2) == 3.0
    assert trajectories.top_mean(values, k=2) == 4.5
    assert trajectories.last_mean(values, k=20) == 3.0
    assert math.isnan(trajectories.top_mean([NAN, NAN]))


def test_summaries_act_along_epoch_for_data_arrays():
    values = xr.DataArray([[1.0, 2.0, 3.0], [4.0, NAN, 6.0]], dims=["run", "epoch"], coords={"run": ["x", "y"]})
    last = trajectories.last_mean(values, k=2)
    assert last.dims == ("run",)
    np.testing.assert_allclose(last.values, [2.5, 5.0])
    loss = xr.DataArray([[10.0, 5.0, 1.0], [10.0, 5.0, 1.0]], dims=["run", "epoch"])
    binned = trajectories.bin_trajectory(loss, values, [1.0, 2.0, 10.0])
    assert binned.dims == ("run", "loss_bin")
    np.testing.assert_allclose(binned.values, [[3.0, 1.5], [6.0, 4.0]])


def test_delta_and_its_significance():
    result = trajectories.delta([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert result.delta == 9.0 and result.mtl_std == 1.0 and result.stl_std == 1.0  # sample std
    assert result.significant  # 9 > 2·(1 + 1)
    close = trajectories.delta([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert close.delta == 2.0 and not close.significant  # 2 < 4: the ±2 std intervals overlap
    one_seed = trajectories.delta([10.0, NAN], [1.0, 2.0, 3.0])
    assert one_seed.delta == 8.0 and math.isnan(one_seed.mtl_std) and not one_seed.significant


def test_percent_change():
    assert trajectories.percent_change(1.5, 1.0) == 50.0
    assert trajectories.percent_change(-3.0, -2.0) == -50.0  # divided by |UMTG|
    np.testing.assert_allclose(trajectories.percent_change([2.0, 1.0, 1.0], [4.0, 0.0, NAN]), [-50.0, NAN, NAN])
    by_task = trajectories.percent_change(xr.DataArray([3.0, 1.0], dims="task"), xr.DataArray([2.0, 4.0], dims="task"))
    np.testing.assert_allclose(by_task.values, [50.0, -75.0])


def test_correlations_against_hand_computed_values():
    result = trajectories.correlations([1.0, 2.0, 3.0, 4.0, NAN], [2.0, 4.0, 5.0, 9.0, 1.0])
    # Pearson by hand on the 4 measured pairs: x̄ = 2.5, ȳ = 5, Σdxdy = 11, Σdx² = 5, Σdy² = 26.
    assert result.n == 4
    assert result.pearson == pytest.approx(11 / math.sqrt(5 * 26))
    assert result.spearman == pytest.approx(1.0)  # monotone
    assert 0 < result.pearson_p < 0.1
    degenerate = trajectories.correlations([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert math.isnan(degenerate.pearson) and degenerate.n == 3


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_summaries_refuse_a_count_that_is_not_positive(k):
    values = np.array([1.0, 2.0, 3.0, 4.0])
    for summary in (lambda: trajectories.last_mean(values, k=k), lambda: trajectories.top_mean(values, k=k),
                    lambda: trajectories.best_validation_mean(values, values, k=k)):
        with pytest.raises(ValueError, match="k must be a positive int"):
            summary()


def test_end_of_training_band_takes_a_dataarray_of_trajectories():
    fast, slow = np.geomspace(2.3, 1e-3, 30), np.geomspace(2.3, 1e-2, 30)
    expected = trajectories.end_of_training_band([fast, slow])
    for dims, data in ((("run", "epoch"), np.stack([fast, slow])), (("epoch", "run"), np.stack([fast, slow]).T)):
        assert trajectories.end_of_training_band(xr.DataArray(data, dims=dims)) == pytest.approx(expected)
    assert expected[0] == pytest.approx(1e-2)  # set by the slower trajectory


def test_percent_change_matches_labels_in_any_order():
    smto = xr.DataArray([110.0, 90.0], dims=["task"], coords={"task": ["a", "b"]})
    uniform = xr.DataArray([100.0, 100.0, 5.0], dims=["task"], coords={"task": ["b", "a", "c"]})
    change = trajectories.percent_change(smto, uniform)
    assert float(change.sel(task="a")) == pytest.approx(10.0) and float(change.sel(task="b")) == pytest.approx(-10.0)
    assert np.isnan(float(change.sel(task="c")))


def test_correlations_leave_out_infinite_values():
    x = np.array([1.0, 2.0, 3.0, np.inf, 5.0])
    y = np.array([2.0, 4.0, 7.0, 8.0, 10.0])
    c = trajectories.correlations(x, y)
    assert c.n == 4
    assert c.pearson == pytest.approx(np.corrcoef(x[[0, 1, 2, 4]], y[[0, 1, 2, 4]])[0, 1])


def test_best_validation_mean_takes_each_task_direction():
    # task "acc": higher is better, best validation 0.9 at epochs 1 and 3; task "err": lower is better, best 0.1 at 0 and 2
    val = xr.DataArray([[0.1, 0.9, 0.2, 0.9], [0.1, 0.9, 0.1, 0.8]], dims=["task", "epoch"], coords={"task": ["acc", "err"]})
    test = xr.DataArray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dims=["task", "epoch"], coords={"task": ["acc", "err"]})
    direction = xr.DataArray([True, False], dims=["task"], coords={"task": ["acc", "err"]})
    result = trajectories.best_validation_mean(val, test, k=2, higher_is_better=direction)
    assert result.dims == ("task",)
    np.testing.assert_allclose(result.values, [3.0, 6.0])


def test_value_at_loss_interpolates_in_log_loss():
    loss = np.array([1.0, 0.1, 0.01])
    score = np.array([0.2, 0.6, 0.8])
    assert trajectories.value_at_loss(loss, score, 0.1) == pytest.approx(0.6)
    # sqrt(0.1 * 0.01) lies half way between epochs 1 and 2 in log loss
    assert trajectories.value_at_loss(loss, score, np.sqrt(0.001)) == pytest.approx(0.7)
    assert np.isnan(trajectories.value_at_loss(loss, score, 0.001))  # never reached


def test_common_levels_lie_inside_every_trajectory():
    loss = np.array([[2.0, 0.5, 0.01], [2.5, 1.0, 0.1]])
    levels = trajectories.common_loss_levels(loss, 3)
    assert len(levels) == 3 and (levels < 2.0).all() and (levels > 0.1).all()
    np.testing.assert_allclose(np.diff(np.log(levels)), np.log(0.1 / 2.0) / 4)  # geometric spacing
    assert trajectories.common_loss_levels(np.array([[2.0, 1.0], [0.5, 0.1]]), 3).size == 0  # no shared range


def test_tables_round_to_what_the_seeds_resolve():
    import pandas as pd

    from mtlcore.analysis import comparisons

    assert [comparisons.resolution(s) for s in (0.43, 1.7, 12.0, 0.0, float("nan"), 0.0049)] == [2, 1, 0, 2, 2, 4]
    assert comparisons.mean_std(0.84321, 0.0043, 100) == "84.32 ± 0.43"
    assert comparisons.mean_std(0.84321, 0.017, 100) == "84.3 ± 1.7"
    assert comparisons.marked_delta(0.0191, True, 0.017, 100) == "+1.9 ✱"
    assert comparisons.marked_delta(-0.0191, False, 0.12, 100) == "-2" and comparisons.marked_delta(float("nan"), 0, 1) == "—"
    table = pd.DataFrame({"mean": [0.80, 0.82], "std": [0.004, 0.006], "delta": [0.0, 0.02], "significant": [False, True],
                          "seeds": [3, 3]}, index=pd.Index(["STL", "MTL: Fashion2"], name="configuration"))
    shown = comparisons.readable_transfer_table(table, "accuracy", 100)
    assert list(shown.columns) == ["test accuracy (points), mean ± std", "Δ vs STL (points)", "seeds"]
    assert shown.loc["MTL: Fashion2"].tolist() == ["82.00 ± 0.60", "+2.00 ✱", 3] and shown.loc["STL"].iloc[1] == ""
