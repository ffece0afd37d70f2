"""Figure helpers: what the axes show, checked on hand-made trajectories."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from mtlcore.analysis import plots  # noqa: E402


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
    fig = plots.generalization_vs_loss(_runs(), group="configuration")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert low < 0.1 and high > 0.8
    fig.canvas.draw()  # over two decades: powers of ten, 2 and 5 (all minor labels overlapped on narrow panels)
    shown = _visible_tick_labels(ax)
    assert {"0.02", "0.05", "0.1", "0.2", "0.5", "1"} <= set(shown) and {s.strip("0.")[0] for s in shown} <= {"1", "2", "5"}
    zoom = plots.generalization_vs_loss(_runs(), group="configuration", zoom_last=0.3)
    zoom.canvas.draw()  # within a decade every tick is labelled
    low, high = sorted(zoom.axes[0].get_xlim())
    assert np.log10(high / low) < 1 and _visible_tick_labels(zoom.axes[0]) == ["0.02", "0.03"]


def _visible_tick_labels(ax) -> list[str]:
    low, high = sorted(ax.get_xlim())
    ticks = [(loc, t.get_text()) for minor in (False, True)
             for loc, t in zip(ax.get_xticks(minor=minor), ax.get_xticklabels(minor=minor))]
    return [text for loc, text in ticks if low <= loc <= high and text]


def test_zoom_survives_a_diverged_seed():
    """One of two seeds turns NaN half-way (diverged): its group has no band late, the zoom still works."""
    runs = _runs().isel(run=[0, 1])
    runs["train_loss"][1, 5:] = np.nan
    runs["test_score"][1, 5:] = np.nan
    ax = plots.generalization_vs_loss(runs, group="configuration", zoom_last=0.5).axes[0]
    low, high = ax.get_ylim()
    assert low < 0.81 < high and low > 0.5  # the surviving seed's late scores (0.81–0.818) are in view


def test_seed_band_against_a_direct_computation():
    """Geometric-mean loss, mean score and sample std per epoch; non-finite values (a diverged seed's NaN, the inf
    loss it stopped at) leave only that seed out; fewer than two finite seeds give a NaN band (no zero-width band)."""
    loss = np.array([[1.0, 0.5, 0.25], [4.0, 2.0, np.inf], [1.0, 0.125, np.nan]])
    score = np.array([[0.1, 0.5, 0.7], [0.3, 0.6, np.nan], [0.2, 0.4, np.nan]])
    x, y, s = plots.seed_band(loss, score)
    assert np.allclose(x, [(1 * 4 * 1) ** (1 / 3), (0.5 * 2 * 0.125) ** (1 / 3), 0.25])
    assert np.allclose(y[:2], [0.2, 0.5]) and y[2] == 0.7
    assert np.allclose(s[:2], [np.std([0.1, 0.3, 0.2], ddof=1), np.std([0.5, 0.6, 0.4], ddof=1)])
    assert np.isnan(s[2])  # one finite seed at the last epoch
    _, _, lone = plots.seed_band(loss[:1], score[:1])
    assert np.isnan(lone).all()


def test_curves_do_not_depend_on_the_dimension_order():
    runs = _runs()
    a = plots.generalization_vs_loss(runs, group="configuration").axes[0].lines
    b = plots.generalization_vs_loss(runs.transpose("epoch", "run"), group="configuration").axes[0].lines
    assert len(a) == len(b) == 2
    for la, lb in zip(a, b):
        assert len(la.get_xdata()) == 10 and np.array_equal(la.get_xdata(), lb.get_xdata())
        assert np.array_equal(la.get_ydata(), lb.get_ydata())


def test_legend_counts_complete_runs_and_ylabel():
    runs = _runs().assign_coords(status=("run", ["complete", "diverged", "complete", "complete"]))
    ax = plots.generalization_vs_loss(runs, group="configuration", ylabel="fashion1 test accuracy").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["MTL (n=2)", "STL (n=1 of 2)"]
    assert ax.get_ylabel() == "fashion1 test accuracy"


def test_factors_vs_loss_one_panel_per_factor_with_log_traces():
    runs = _runs()
    runs["sharpness"] = runs["test_score"] * 0.01
    runs["fisher_trace"] = runs["train_loss"] * 100
    fig = plots.factors_vs_loss(runs, ["sharpness", "fisher_trace"], group="configuration")
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["sharpness", "fisher trace"]
    assert all(ax.xaxis_inverted() and ax.get_xscale() == "log" for ax in fig.axes)


def test_quadrant_plot_points_colours_and_shading():
    import matplotlib.colors as mcolors
    import pandas as pd

    changes = pd.DataFrame({
        "group": ["fashion1+fashion2", "fashion1+fashion2", "fashion1+noisy_fashion", "fashion1+noisy_fashion"],
        "task": ["fashion1", "fashion2", "fashion1", "noisy_fashion"], "aggregator": ["mgda", "mgda", "mgda", "pcgrad"],
        "significant": [True, False, True, False], "sharpness": [-10.0, 5.0, 20.0, -3.0],
        "generalization": [1.0, -2.0, -0.5, 0.25]})
    fig = plots.quadrant_plot(changes, ["sharpness"])
    ax = fig.axes[0]
    from matplotlib.collections import PathCollection, PolyCollection

    points = [c for c in ax.collections if isinstance(c, PathCollection)]  # scatter; the shading is PolyCollection
    assert [tuple(p.get_offsets()[0]) for p in points] == list(zip(changes["sharpness"], changes["generalization"]))
    edges = [mcolors.to_hex(p.get_edgecolor()[0]) for p in points]
    assert edges[0] != edges[2]  # fashion1 in two task pairs: two colours
    assert not {mcolors.to_hex("tab:green"), mcolors.to_hex("tab:red")} & set(edges)  # those are the shading
    filled = [p.get_facecolor().shape[0] > 0 and p.get_facecolor()[0][3] > 0 for p in points]
    assert filled == [True, False, True, False]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]  # below the grid of panels
    assert legend == ["mgda", "pcgrad", "fashion1 (fashion1+fashion2)", "fashion2 (fashion1+fashion2)",
                      "fashion1 (fashion1+noisy_fashion)", "noisy_fashion (fashion1+noisy_fashion)"]
    shades = [c for c in ax.collections if isinstance(c, PolyCollection)]
    green, red = (s.get_paths()[0].get_extents() for s in shades)
    assert green.x1 <= 0 <= green.y0 and red.x0 >= 0 >= red.y1  # top-left and bottom-right


def test_ylabel_defaults_to_the_long_name():
    runs = _runs()
    runs["test_score"].attrs["long_name"] = "test depth error"
    assert plots.generalization_vs_loss(runs, group="configuration").axes[0].get_ylabel() == "test depth error"
    del runs["test_score"].attrs["long_name"]
    assert plots.generalization_vs_loss(runs, group="configuration").axes[0].get_ylabel() == "test score"


def test_quadrant_plot_lays_four_factors_out_two_by_two():
    import pandas as pd

    factors = ["sharpness", "fisher_trace", "grad_cov_trace", "min_train_loss"]
    changes = pd.DataFrame({"group": ["p"], "task": ["t"], "aggregator": ["mgda"], "significant": [True],
                            "generalization": [1.0], **{f: [1.0] for f in factors}})
    fig = plots.quadrant_plot(changes, factors)
    boxes = [ax.get_position() for ax in fig.axes if ax.get_visible()]
    assert len(boxes) == 4 and len({round(b.x0, 3) for b in boxes}) == 2 and len({round(b.y0, 3) for b in boxes}) == 2


def test_publish_saves_the_figure_and_shows_its_caption(tmp_path, monkeypatch):
    import IPython.display
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert plots.publish(fig, "Figure 1 (paper A)", "A line.", tmp_path, "sec3-figure1") is None  # nothing to echo
    svg, png = tmp_path / "figures" / "sec3-figure1.svg", tmp_path / "figures" / "sec3-figure1.png"
    assert svg.read_text().lstrip().startswith("<?xml") and png.read_bytes()[:4] == b"\x89PNG"
    assert shown[0] is fig and shown[1].data.startswith("**Figure 1 (paper A).** A line.")
    assert not plt.fignum_exists(fig.number)
