"""Figure helpers: what the axes show, checked on hand-made trajectories."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from mtlcore import plots  # noqa: E402


def _runs():
    epochs = np.arange(10)
    loss = np.exp(-0.5 * epochs)  # 1 → 0.011
    score = np.where(epochs < 5, 0.1 + 0.1 * epochs, 0.80 + 0.002 * epochs)
    train = np.stack([loss, loss * 1.1, loss, loss * 0.9])
    test = np.stack([score, score + 0.001, score + 0.01, score + 0.011])
    return xr.Dataset({"train_loss": (("run", "epoch"), train), "test_score": (("run", "epoch"), test)},
                      coords={"configuration": ("run", ["STL", "STL", "MTL", "MTL"])})


def test_zoom_last_limits_axes_to_the_late_bands():
    fig = plots.generalization_vs_loss(_runs(), group="configuration", zoom_last=0.5)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0.78 < low < 0.81 and 0.81 < high < 0.84  # the early scores (0.1–0.5) are outside
    assert ax.xaxis_inverted()  # training still reads left to right
    assert max(ax.get_xlim()) < 0.1  # only the late (small) losses


def test_without_zoom_every_epoch_is_visible():
    ax = plots.generalization_vs_loss(_runs(), group="configuration").axes[0]
    low, high = ax.get_ylim()
    assert low < 0.1 and high > 0.8


def test_zoom_survives_a_diverged_seed():
    """One of two seeds turns NaN half-way (diverged): its group has no band late, the zoom still works."""
    runs = _runs().isel(run=[0, 1])
    runs["train_loss"][1, 5:] = np.nan
    runs["test_score"][1, 5:] = np.nan
    ax = plots.generalization_vs_loss(runs, group="configuration", zoom_last=0.5).axes[0]
    low, high = ax.get_ylim()
    assert low < 0.81 < high and low > 0.5  # the surviving seed's late scores (0.81–0.818) are in view
