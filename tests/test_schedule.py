"""Trajectory factors measured during training: schedule, placement, no effect on training, validation."""
from __future__ import annotations

import numpy as np
import pytest

from mtlcore.training import ConfigError, RunConfig
from mtlcore.training import trainer as train

from conftest import SMALL

FAST = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 64, "every": 2,
        "sharpness": {"steps": 3, "batch_size": 32}, "coherence": {"small_batch": 8, "large_batch": 64},
        "conflict": {"num_batches": 3}}


def config(tasks=("fashion1", "fashion2"), **changes) -> RunConfig:
    return RunConfig.from_dict({"setting": "fashion_mtl", "setting_options": SMALL, "epochs": 3, "batch_size": 32, "device": "cpu",
                                "tasks": list(tasks), **changes})


def test_measuring_does_not_change_training_and_fills_the_scheduled_epochs(fake_data_root):
    plain = train.run(config(), data_root=fake_data_root, progress=False)
    measured = train.run(config(metrics=FAST), data_root=fake_data_root, progress=False)
    np.testing.assert_array_equal(plain["train_loss"].values, measured["train_loss"].values)
    np.testing.assert_array_equal(plain["test_score"].values, measured["test_score"].values)
    for name in ("sharpness", "fisher_trace", "grad_cov_trace", "grad_norm_sq", "conflict"):
        values = measured[name].values
        assert np.isfinite(values[[0, 2]]).all(), name  # every 2 epochs from epoch 0
        assert np.isnan(values[[1, 3]]).all(), name
    assert np.isfinite(measured["multitask_grad_cov_trace"].values[[0, 2]]).all()
    assert (measured["sharpness"].values[[0, 2]] >= 0).all() and (measured["fisher_trace"].values[[0, 2]] > 0).all()
    assert (np.abs(measured["conflict"].values[[0, 2]]) <= 1 + 1e-6).all()
    assert np.isnan(plain["sharpness"].values).all()  # nothing measured unless asked


def test_stl_has_no_conflict_and_measurements_repeat(fake_data_root):
    a = train.run(config(("fashion1",), metrics=FAST, epochs=1), data_root=fake_data_root, progress=False)
    b = train.run(config(("fashion1",), metrics=FAST, epochs=1), data_root=fake_data_root, progress=False)
    assert np.isnan(a["conflict"].values).all()
    np.testing.assert_array_equal(a["sharpness"].values, b["sharpness"].values)
    np.testing.assert_array_equal(a["fisher_trace"].values, b["fisher_trace"].values)


def test_budget_stops_measuring(fake_data_root):
    ds = train.run(config(metrics={**FAST, "every": 1, "budget_seconds": 1e-9}), data_root=fake_data_root, progress=False)
    assert np.isfinite(ds["sharpness"].values[0]).all() and np.isnan(ds["sharpness"].values[1:]).all()


@pytest.mark.parametrize("metrics, pattern", [
    ({"factors": ["sharpnes"]}, r"unknown factor\(s\) \['sharpnes'\].*valid factors: \['sharpness'"),
    ({"evry": 2}, r"unknown metrics key\(s\) \['evry'\] \(did you mean \['every'\]\?\)"),
    ({"every": 0}, r"metrics.every=0 must be a positive integer"),
    ({"sharpness": {"radius": 1}}, r"metrics.sharpness: unknown option\(s\) \['radius'\]; valid options: \[.*'rho'"),
    ({"factors": ["coherence"], "examples": 100}, r"large_batch=1024 exceeds the 100 examples measured"),
])
def test_bad_metrics_config_is_refused(metrics, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config(metrics=metrics)


@pytest.mark.parametrize("aggregator, options", [("dbmtl", {}), ("mgda", {"normalization": "loss+"}), ("pcgrad", {}),
                                                 ("uncertainty", {}), ("dwa", {}), ("gradnorm", {}), ("rlw", {})])
def test_conflict_is_measured_for_methods_that_read_the_losses(fake_data_root, aggregator, options):
    """Eq. 6's d is the run's own update rule; DB-MTL and loss-normalised MGDA also need each batch's losses, and
    loss-level methods have a direction before their first step (epoch 0)."""
    metrics = {"factors": ["conflict"], "examples": 64, "every": 1, "conflict": {"num_batches": 2}}
    ds = train.run(config(epochs=1, aggregator=aggregator, aggregator_options=options, metrics=metrics),
                   data_root=fake_data_root, progress=False)
    assert ds.attrs["status"] == "complete" and np.isfinite(ds["conflict"].values).all()
    assert (np.abs(ds["conflict"].values) <= 1).all()
