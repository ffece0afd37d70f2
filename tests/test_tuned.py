"""Paper B's study: Δ_mtm and the mean rank against hand-computed values, the fixed weights' EMA, the MultiFashion
images against their source labels, the per-method search (its rule recomputed from the run files, a second call
training nothing, a lost run retrained alone), paper B's conflict factor, and the claims on hand-built tables."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import write_fake_mnist_folder

from mtlcore import aggregators, settings, training
from mtlcore.analysis import tuned
from mtlcore.settings.locate import write_idx
from mtlcore.settings.multi_fashion import data as multi_fashion
from mtlcore.training import load_run, run_path
from mtlcore.training.config import ConfigError, RunConfig
from mtlcore.training.selection import budgeted, check_search, grid_points, method_grid, search

# --- Δ_mtm and the mean rank --------------------------------------------------------------------------------------


def test_delta_mtm_signs_lower_is_better_scores_and_weighs_tasks_equally():
    table = pd.DataFrame({
        "task": ["seg", "depth", "depth"], "score": ["miou", "abs_err", "rel_err"],
        "value": [0.80, 0.90, 0.55], "baseline": [0.75, 1.00, 0.50], "higher_is_better": [True, False, False]})
    # seg: +(0.80 − 0.75)/0.75 = +6.667 %; depth: abs_err 0.9 < 1.0 is +10 %, rel_err 0.55 > 0.5 is −10 %: mean 0
    assert tuned.delta_mtm(table) == pytest.approx((100 * 0.05 / 0.75 + 0.0) / 2)
    worse = table.assign(value=[0.70, 1.10, 0.50])  # −6.667 %; depth: −10 % and 0 %: −5 %
    assert tuned.delta_mtm(worse) == pytest.approx((-100 * 0.05 / 0.75 - 5.0) / 2)
    with pytest.raises(ValueError, match=r"baseline of 0 for task\(s\) \['seg'\]"):
        tuned.delta_mtm(table.assign(baseline=[0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['higher_is_better'\]"):
        tuned.delta_mtm(table.drop(columns="higher_is_better"))


def test_mean_rank_ranks_each_metric_in_its_direction_ties_shared_missing_last():
    means = pd.DataFrame({"acc": [0.9, 0.8, 0.8], "err": [0.3, 0.1, np.nan]}, index=["a", "b", "c"])
    ranks = tuned.mean_rank(means, {"acc": True, "err": False})
    # acc: a 1, b and c tied 2.5; err: b 1, a 2, c (missing) 3
    assert ranks.to_dict() == {"a": 1.5, "b": 1.75, "c": 2.75}
    with pytest.raises(ValueError, match=r"no direction for metric\(s\) \['err'\]"):
        tuned.mean_rank(means, {"acc": True})


def test_run_deltas_compare_with_the_mean_single_task_run():
    scores = pd.DataFrame({
        "run": ["s0", "s1", "t0", "m0", "m0"], "task": ["a", "a", "b", "a", "b"], "score": ["acc"] * 5,
        "value": [0.5, 0.7, 0.4, 0.66, 0.38], "higher_is_better": [True] * 5})
    labels = {"s0": "STL", "s1": "STL", "t0": "STL", "m0": "uniform"}
    # baselines: a (0.5 + 0.7)/2 = 0.6, b 0.4; m0: a +10 %, b −5 %: Δ_mtm = 2.5
    assert tuned.run_deltas(scores, labels).to_dict() == {"m0": pytest.approx(2.5)}


def test_scores_are_read_at_each_tasks_best_validation_epoch():
    val = np.array([[np.nan, np.nan], [0.5, 0.9], [0.7, 0.8], [0.6, 0.85]])  # left best at 2, right at 1
    test = np.array([[0.0, 0.0], [0.51, 0.91], [0.72, 0.82], [0.63, 0.84]])
    runs = xr.Dataset(
        {"val_score": (("run", "epoch", "task"), val[None]),
         "test_scores": (("run", "epoch", "task", "score"), test[None, :, :, None])},
        coords={"run": ["r"], "epoch": np.arange(4), "task": ["left", "right"], "score": ["accuracy"],
                "status": ("run", ["complete"]), "tasks": ("run", [json.dumps(["left", "right"])]),
                "setting": ("run", ["multi_fashion"])})
    table = tuned.scores_at_best_validation(runs).set_index("task")
    assert table.loc["left", "epoch"] == 2 and table.loc["left", "value"] == 0.72
    assert table.loc["right", "epoch"] == 1 and table.loc["right", "value"] == 0.91


# --- fixed weights --------------------------------------------------------------------------------------------------


def test_fixed_weights_are_the_renormalised_ema_of_the_normalised_epoch_weights():
    weights = np.array([[np.nan, np.nan], [1.0, 1.0], [3.0, 1.0], [1.0, 3.0]])  # epoch 0 before training: skipped
    # p = [.5, .5], [.75, .25], [.25, .75]; m1 = .1 p1 = [.05, .05]; m2 = .9 m1 + .1 p2 = [.12, .07];
    # m3 = .9 m2 + .1 p3 = [.133, .138]; renormalised: / .271
    np.testing.assert_allclose(tuned.fixed_weights(weights, 0.9), [0.133 / 0.271, 0.138 / 0.271])
    np.testing.assert_allclose(tuned.fixed_weights(weights, 0.0), [0.25, 0.75])  # β = 0: the last epoch's
    with pytest.raises(ValueError, match="NaN or inf.*graddrop and dbmtl"):
        tuned.fixed_weights(np.array([[np.nan, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="sum to 0 <= 0"):
        tuned.fixed_weights(np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match=r"beta=1\.0 must be in \[0, 1\)"):
        tuned.fixed_weights(weights, 1.0)


def test_fixed_weights_record_their_source_run():
    agg = aggregators.get("fixed", weights=[0.3, 0.7], source="abc123")
    assert agg.options == {"weights": [0.3, 0.7], "source": "abc123"}
    with pytest.raises(ValueError, match="fixed: source must be a string"):
        aggregators.get("fixed", weights=[1.0], source=3)
    base = {"setting": "multi_fashion", "tasks": ["left", "right"], "aggregator": "fixed"}
    one = RunConfig.from_dict({**base, "aggregator_options": {"weights": [0.3, 0.7], "source": "a"}})
    other = RunConfig.from_dict({**base, "aggregator_options": {"weights": [0.3, 0.7], "source": "b"}})
    assert one.content_hash() != other.content_hash()  # the source is part of the run's identity


# --- MultiFashion ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_fashion_root(tmp_path_factory):
    """Fashion-MNIST files whose every pixel holds 20 + 20·label: a composite's corners show its items' labels."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(3)
    for prefix, n in (("train", 400), ("t10k", 200)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = np.broadcast_to((20 + 20 * labels)[:, None, None], (n, 28, 28)).astype(np.uint8)
        write_idx(root / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_multi_fashion_labels_are_the_classes_of_the_items_on_the_image(labelled_fashion_root):
    setting = settings.get("multi_fashion")
    options = {"train_size": 150, "val_size": 50, "test_size": 100, "offset": 8}
    loaded = setting.load(["left", "right"], options, root=labelled_fashion_root, download=False)
    mean, std = loaded.info["normalization"]
    for split, size in (("train", 150), ("val", 50), ("test", 100)):
        joint = loaded.joint[split]
        pixels = np.rint((joint.inputs.squeeze(1).numpy() * std + mean) * 255).astype(int)
        assert pixels.shape == (size, 28, 28)
        # the top-left corner shows the left item only, the bottom-right corner the right item only
        np.testing.assert_array_equal((pixels[:, 0, 0] - 20) // 20, joint.targets["left"].numpy())
        np.testing.assert_array_equal((pixels[:, -1, -1] - 20) // 20, joint.targets["right"].numpy())
    again = setting.load(["left", "right"], options, root=labelled_fashion_root, download=False)
    for split in ("train", "val", "test"):  # a pure function of the options
        assert np.array_equal(loaded.joint[split].inputs.numpy(), again.joint[split].inputs.numpy())
        assert all(np.array_equal(loaded.joint[split].targets[t], again.joint[split].targets[t]) for t in ("left", "right"))
    other = setting.load(["left", "right"], {**options, "data_seed": 1}, root=labelled_fashion_root, download=False)
    assert not np.array_equal(loaded.joint["train"].targets["left"], other.joint["train"].targets["left"])
    with pytest.raises(ValueError, match=r"asked for 150 \+ 150 \+ 100 \+ 100 = 500 examples but only 400"):
        setting.load(["left"], {**options, "val_size": 100}, root=labelled_fashion_root, download=False)


def test_multi_fashion_overlays_by_the_maximum_and_refuses_bad_offsets():
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 5, 5], right[0, 5, 5], right[0, 9, 9] = 100, 200, 50
    np.testing.assert_array_equal(multi_fashion.compose(left, right, 0)[0][[5, 9], [5, 9]], [200, 50])
    # offset 28: side by side on a 56 × 56 canvas, halved: each item keeps its own quarter
    full_left, full_right = np.full((1, 28, 28), 80, np.uint8), np.full((1, 28, 28), 160, np.uint8)
    image = multi_fashion.compose(full_left, full_right, 28)[0]
    assert image[:14, :14].tolist() == np.full((14, 14), 80).tolist()
    assert image[14:, 14:].tolist() == np.full((14, 14), 160).tolist() and image[0, 27] == 0
    with pytest.raises(ValueError, match=r"offset=29 must be an integer in \[0, 28\]"):
        multi_fashion.compose(left, right, 29)
    with pytest.raises(ValueError, match="setting option offset=30 must be at most 28"):
        settings.get("multi_fashion").resolve_options({"offset": 30})


def test_multi_fashion_reads_the_real_fashion_mnist(real_data_root):
    loaded = settings.get("multi_fashion").load(["left", "right"], {"train_size": 100, "val_size": 20, "test_size": 20},
                                                root=real_data_root)
    assert loaded.joint["train"].inputs.shape == (100, 1, 28, 28)
    assert set(loaded.info["files_md5"]) >= {"fashion-mnist/train-images-idx3-ubyte.gz"}


# --- the search -----------------------------------------------------------------------------------------------------

TINY = {"train_size": 64, "val_size": 32, "test_size": 32, "data_seed": 0}


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    write_fake_mnist_folder(root / "fashion-mnist", 600, 200, seed=5)
    return root


def test_a_search_tunes_each_method_on_its_own_grid_and_reuses_its_runs(fashion_root, tmp_path, one_thread):
    base = {"setting": "multi_fashion", "setting_options": TINY, "epochs": 2, "batch_size": 32, "optimizer": "adam",
            "device": "cpu"}
    spec = {"grid": {"lr": [1e-5, 0.01]}, "options": {"cagrad": {"c": [0.2, 0.5]}}, "seeds": [0]}
    metrics = {"factors": ["conflict_to_mean"], "examples": 32, "conflict_to_mean": {"num_batches": 2}}
    tasks = [["left", "right"]]
    chosen = search(base, ["uniform", "cagrad"], spec, tasks, tmp_path, metrics=metrics, data_root=fashion_root,
                    progress=False)
    assert chosen["uniform"].runs == 2 and chosen["cagrad"].runs == 4
    assert chosen["cagrad"].table["aggregator_options"].tolist() == [{"c": 0.2}, {"c": 0.5}] * 2
    for method, selection in chosen.items():  # the rule, recomputed from the run files: the best mean rank wins
        points = selection.table.drop(columns=["mean rank", "chosen", "diverged runs", "mean best validation score"])
        best = []
        for point in points.to_dict("records"):
            config = RunConfig.from_dict({**base, **point, "tasks": tasks[0], "seed": 0, "metrics": metrics})
            ds = load_run(run_path(config, tmp_path))
            assert np.isfinite(ds["conflict_to_mean"].values[1:]).all()  # measured along training
            best.append([np.nanmax(ds["val_score"].sel(task=t).values[1:]) for t in tasks[0]])
        best = np.array(best)
        ranks = np.array([[1 + (best[:, c] > best[p, c]).sum() + ((best[:, c] == best[p, c]).sum() - 1) / 2
                           for c in range(best.shape[1])] for p in range(len(best))])
        np.testing.assert_allclose(selection.table["mean rank"], ranks.mean(axis=1))
        first_best = int(np.flatnonzero(ranks.mean(axis=1) == ranks.mean(axis=1).min())[0])
        assert selection.chosen == points.to_dict("records")[first_best]
    files = sorted((tmp_path / "runs").glob("*.nc"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = search(base, ["uniform", "cagrad"], spec, tasks, tmp_path, metrics=metrics, data_root=fashion_root,
                   progress=False)
    assert {m: s.chosen for m, s in again.items()} == {m: s.chosen for m, s in chosen.items()}
    assert sorted((tmp_path / "runs").glob("*.nc")) == files  # nothing new trained
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files)  # nothing retrained
    lost = files[0]
    lost.unlink()  # a search killed before this run finished: the next call trains it and only it
    search(base, ["uniform", "cagrad"], spec, tasks, tmp_path, metrics=metrics, data_root=fashion_root, progress=False)
    assert lost.exists() and all(f.stat().st_mtime_ns == stamps[f] for f in files[1:])


def test_a_search_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match=r"search.options names \['famo'\], which the search does not run"):
        check_search({"grid": {"lr": [0.1]}, "options": {"famo": {"gamma": [0.01]}}}, ["uniform", "cagrad"])
    with pytest.raises(ConfigError, match="cannot vary `aggregator`"):
        check_search({"grid": {"lr": [0.1], "aggregator": ["mgda"]}}, ["uniform"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seed'\]"):
        check_search({"grid": {"lr": [0.1]}, "seed": [0]}, ["uniform"])
    with pytest.raises(ConfigError, match=r"search.budget=0 must be a positive integer"):
        check_search({"grid": {"lr": [0.1]}, "budget": 0}, ["uniform"])
    with pytest.raises(ConfigError, match=r"search.options.cagrad: \['c'\] must be non-empty lists"):
        method_grid({"lr": [0.1]}, "cagrad", {"c": 0.5})
    with pytest.raises(ValueError, match=r"unknown SMTO\(s\) \['uniform'\]"):
        tuned.smtos(["uniform", "mgda"])
    assert "uniform" not in tuned.smtos("all") and "fixed" not in tuned.smtos("all") and "cagrad" in tuned.smtos("all")


def test_paper_b_conflict_is_measured_without_changing_the_trajectory(fashion_root, one_thread):
    base = {"setting": "multi_fashion", "tasks": ["left", "right"], "setting_options": TINY, "epochs": 2,
            "batch_size": 32, "aggregator": "mgda", "device": "cpu"}
    plain = training.run(base, data_root=fashion_root, progress=False)
    measured = training.run({**base, "metrics": {"factors": ["conflict_to_mean"], "examples": 32,
                                                 "conflict_to_mean": {"num_batches": 3}}},
                            data_root=fashion_root, progress=False)
    for name in ("train_loss", "val_score", "test_score", "task_weight"):
        np.testing.assert_array_equal(plain[name].values, measured[name].values)
    cosines = measured["conflict_to_mean"].values
    assert np.isnan(plain["conflict_to_mean"].values).all()
    assert np.isfinite(cosines).all() and (np.abs(cosines) <= 1 + 1e-6).all()
    stl = training.run({**base, "tasks": ["left"], "aggregator": "uniform", "metrics": {
        "factors": ["conflict_to_mean"], "examples": 32, "conflict_to_mean": {"num_batches": 2}}},
        data_root=fashion_root, progress=False)
    assert np.isnan(stl["conflict_to_mean"].values).all()  # one task: nothing to conflict with


# --- the claims -----------------------------------------------------------------------------------------------------


def _table(rows: dict[str, tuple[float, float]], conflict: float) -> pd.DataFrame:
    return pd.DataFrame({"delta_mtm": {m: v[0] for m, v in rows.items()},
                         "delta_mtm_std": {m: v[1] for m, v in rows.items()},
                         "conflict": {m: conflict for m in rows}})


def test_claims_follow_the_two_std_rule_and_the_conflict_order():
    interfering = _table({"uniform": (0.0, 1.0), "cagrad": (10.0, 1.0), "mgda": (-8.0, 1.0),
                          "fixed (cagrad)": (9.0, 1.0)}, conflict=0.2)
    agreeing = _table({"uniform": (5.0, 1.0), "cagrad": (5.5, 1.0), "mgda": (4.0, 1.0),
                       "fixed (cagrad)": (1.0, 0.5)}, conflict=0.8)
    fixed = {"A": ("fixed (cagrad)", "cagrad"), "B": ("fixed (cagrad)", "cagrad")}
    found = tuned.claims({"A": interfering, "B": agreeing}, fixed)
    a, b = found.settings
    assert a.smtos_better == ("cagrad",) and a.smtos_worse == ("mgda",) and a.best == "cagrad"
    assert a.best_vs_uniform == "better" and a.fixed_vs_source == "similar" and a.fixed_vs_uniform == "better"
    assert b.smtos_better == () and b.best_vs_uniform == "similar" and b.fixed_vs_source == "worse"
    assert found.smtos_beat_uniform and found.uniform_competitive and found.interference
    assert found.fixed_match is False  # B's fixed weights: 1 + 2·0.5 = 2 < 5.5 − 2·1 = 3.5
    assert '"fixed weights can match SMTOs" **does not hold**' in found.text
    swapped = tuned.claims({"A": interfering.assign(conflict=0.9), "B": agreeing.assign(conflict=0.1)}, fixed)
    assert swapped.interference is False  # the larger, significant gain sits where the tasks agree most
    alone = tuned.claims({"A": interfering}, {"A": fixed["A"]})
    assert alone.interference is None and alone.fixed_match and not alone.uniform_competitive
    assert "**cannot be judged** (it needs two settings or more" in alone.text
    assert tuned.compare(interfering.assign(delta_mtm_std=math.nan), "cagrad", "uniform") == "unknown"


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_every_run_of_the_chapter_is_a_valid_config(profile):
    """Each setting's single-task and multi-task runs under every method and grid point pass validation before
    anything trains (the fixed weights with placeholder weights, one per task)."""
    from mtlcore.analysis.studies import Study
    from mtlcore.book import profile_parameters

    p = profile_parameters(profile)["paperb_uniform"]
    for spec in p["study_settings"]:
        study = Study.from_dict({**p["common"], "device": "cpu", "seeds": p["seeds"], **spec})
        methods = tuned.smtos(p["aggregators"], len(study.tasks))
        assert profile == "smoke" or len(methods) >= 8
        check_search(p["search_space"], ["uniform", *methods])
        for method in ["uniform", *methods, "fixed"]:
            options = p["search_space"].get("options", {}).get(method)
            if method == "fixed":
                options = {"weights": [[1 / len(study.tasks)] * len(study.tasks)], "source": ["run"]}
            for point in grid_points(method_grid(p["search_space"]["grid"], method, options)):
                RunConfig.from_dict({**study.config, **point, "tasks": list(study.tasks), "metrics": p["metrics"]})
        for task in study.tasks:
            RunConfig.from_dict({**study.config, "tasks": [task], "metrics": p["metrics"]})


def test_a_budgeted_search_draws_distinct_grid_points_in_grid_order():
    points = grid_points(method_grid({"lr": [0.01, 0.005, 0.001], "weight_decay": [0.0, 1e-4]}, "cagrad",
                                     {"c": [0.2, 0.5, 0.8]}))
    drawn = budgeted(points, 5, "cagrad")
    assert len(drawn) == 5 and all(p in points for p in drawn)
    assert len({json.dumps(p, sort_keys=True) for p in drawn}) == 5  # without replacement
    assert [points.index(p) for p in drawn] == sorted(points.index(p) for p in drawn)  # grid order
    assert budgeted(points, 5, "cagrad") == drawn  # the same draw every time
    assert budgeted(points, 5, "famo") != drawn  # each method its own draw
    assert budgeted(points, 18, "cagrad") == points and budgeted(points, None, "cagrad") == points
