"""Appendix C's per-score tables and Appendix B.4's comparison at comparable training loss."""
import numpy as np
import pytest
import xarray as xr

from mtlcore.analysis import appendix, comparisons


def _runs(loss, **variables):
    """Runs of one task: `loss` and each variable as (run, epoch) arrays (NaN-padded), all complete."""
    n, epochs = np.asarray(loss).shape
    data = {"train_loss": (("run", "epoch"), np.asarray(loss, float))}
    data.update({k: (("run", "epoch"), np.asarray(v, float)) for k, v in variables.items()})
    return xr.Dataset(data, coords={"run": [f"r{i}" for i in range(n)], "epoch": np.arange(epochs),
                                    "status": ("run", ["complete"] * n)})


def test_binned_summaries_read_each_factor_in_its_band_by_hand():
    nan = np.nan
    # Losses 16..1 (run 0) and 16..2 (run 1): 4 geometric bins over both have edges 1, 2, 4, 8, 16; skipping the
    # highest bin, the early band is the next one, [4, 8], which holds the losses 6 and 5. Run 1 has the highest minimum (2): its range 2..16 in 4
    # bins puts its lowest bin at [2, 2·8^(1/4)] ≈ [2, 3.36], the end-of-training band.
    loss = [[16, 6, 5, 2, 1], [16, 6, 5, 2, nan]]
    fisher = [[1.0, 10.0, 30.0, 5.0, 2.0], [1.0, 20.0, 50.0, 4.0, nan]]
    sharp = [[9.0, 8.0, 7.0, 6.0, 5.0], [9.0, 8.0, 7.0, 3.0, nan]]
    summary, bands = comparisons.binned_summaries(_runs(loss, fisher_trace=fisher, sharpness=sharp), n_bins=4,
                                                  skip_highest=1, early_width=1, end_width=1)
    assert bands["fisher_trace"] == pytest.approx((4.0, 8.0))
    assert bands["sharpness"] == pytest.approx((2.0, 2 * 8 ** 0.25))
    np.testing.assert_allclose(summary["fisher_trace"], [(10 + 30) / 2, (20 + 50) / 2])
    np.testing.assert_allclose(summary["sharpness"], [6.0, 3.0])  # loss 1 lies below the band: not compared
    assert "grad_cov_trace" not in summary  # not measured


def test_binned_summaries_leave_a_run_without_a_measured_checkpoint_in_the_band_out():
    nan = np.nan
    loss = [[16, 6, 5, 2, 1], [16, 6, 5, 2, 1]]
    fisher = [[1.0, nan, nan, 5.0, 2.0], [1.0, 20.0, 50.0, 4.0, 3.0]]  # run 0 measured outside [4, 8] only
    summary, _ = comparisons.binned_summaries(_runs(loss, fisher_trace=fisher), n_bins=4, skip_highest=1, early_width=1)
    assert np.isnan(summary["fisher_trace"].values[0]) and summary["fisher_trace"].values[1] == pytest.approx(35.0)


def test_score_summaries_average_every_score_at_the_best_validation_checkpoints():
    from mtlcore.settings.base import Score

    def score(name, higher, percent):
        return Score(name, higher, statistics=None, value=None, percent=percent)

    scores = (score("accuracy", True, True), score("error", False, False))
    rng = np.random.default_rng(0)
    runs, epochs = 3, 8
    val = rng.uniform(size=(runs, epochs))
    test = rng.uniform(size=(runs, epochs, 3))  # a third score of another task is left alone
    ds = xr.Dataset({"val_score": (("run", "epoch"), val), "test_scores": (("run", "epoch", "score"), test)},
                    coords={"run": ["a", "b", "c"], "epoch": np.arange(epochs), "score": ["accuracy", "error", "f1"],
                            "status": ("run", ["complete", "complete", "diverged"])})
    summary = appendix.score_summaries(ds, scores, k=3)
    assert set(summary.data_vars) == {"accuracy", "error"}
    for i in range(2):  # brute force: the 3 trained epochs (1..7) of largest (primary) validation score
        best = 1 + np.argsort(-val[i, 1:])[:3]
        for j, name in enumerate(["accuracy", "error"]):
            assert summary[name].values[i] == pytest.approx(test[i, best, j].mean())
    assert np.isnan(summary["accuracy"].values[2])  # a diverged run has no summary
    table = appendix.task_table(ds, xr.DataArray(["STL", "MTL", "MTL"], dims="run"), scores, k=3)
    acc, err = summary["accuracy"].values, summary["error"].values
    assert table.loc["MTL", "delta_accuracy"] == pytest.approx(acc[1] - acc[0])
    assert table.loc["MTL", "delta_error"] == pytest.approx(err[0] - err[1])  # lower is better: STL − MTL
    shown = appendix.shown_task_table(table, scores)
    assert shown.loc["STL", "Δ accuracy"] == "" and shown.loc["STL", "accuracy"] == f"{acc[0] * 100:.2f} ± nan"
    assert shown.loc["MTL", "Δ error"] == f"{err[0] - err[1]:+.2f}"
    with pytest.raises(ValueError, match=r"scores \['miou'\] are not in the runs"):
        appendix.score_summaries(ds, (score("miou", True, True),))
