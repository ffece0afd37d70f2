"""§5's library: the random auxiliary sets, the per-run summary and the correlation table."""
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from mtlcore.analysis import conflict_study

POOL = [f"t{i}" for i in range(8)]


def test_aux_sets_are_deterministic_distinct_sized_and_never_hold_the_target():
    sets = conflict_study.draw_aux_sets("t3", POOL, [1, 2, 4], 5, seed=7)
    again = conflict_study.draw_aux_sets("t3", list(reversed(POOL))[::-1], [1, 2, 4], 5, seed=7)
    assert sets == again
    assert [s.size for s in sets] == [1] * 5 + [2] * 5 + [4] * 5
    for s in sets:
        assert len(s.tasks) == s.size == len(set(s.tasks)) and "t3" not in s.tasks
        assert set(s.tasks) <= set(POOL) and s.run_tasks[0] == "t3"
    for size in (1, 2, 4):
        drawn = [frozenset(s.tasks) for s in sets if s.size == size]
        assert len(set(drawn)) == 5  # distinct within a size
    other_seed = conflict_study.draw_aux_sets("t3", POOL, [1, 2, 4], 5, seed=8)
    assert other_seed != sets


def test_a_size_is_drawn_independently_of_the_other_sizes_and_of_more_draws():
    alone = conflict_study.draw_aux_sets("t0", POOL, [2], 3, seed=1)
    together = conflict_study.draw_aux_sets("t0", POOL, [1, 2], 3, seed=1)
    assert [s for s in together if s.size == 2] == alone


def test_all_sets_of_a_size_can_be_drawn_and_are_uniform():
    every = {frozenset(c) for c in itertools.combinations([t for t in POOL if t != "t0"], 3)}
    sets = conflict_study.draw_aux_sets("t0", POOL, [3], math.comb(7, 3))
    assert {frozenset(s.tasks) for s in sets} == every
    # Uniform: over many seeds each single task is drawn about equally often as a size-1 set.
    counts = {t: 0 for t in POOL if t != "t0"}
    for seed in range(700):
        counts[conflict_study.draw_aux_sets("t0", POOL, [1], 1, seed=seed)[0].tasks[0]] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3


def test_large_pools_draw_without_enumerating():
    pool = [f"task{i}" for i in range(40)]
    sets = conflict_study.draw_aux_sets("task0", pool, [10], 6, seed=0)
    assert len({frozenset(s.tasks) for s in sets}) == 6 and all("task0" not in s.tasks for s in sets)


@pytest.mark.parametrize("sizes, per_size, message", [
    ([8], 1, r"set size 8 is not valid for target 't0': the pool holds 7 other tasks, so sizes run from 1 to 7"),
    ([0], 1, "sizes run from 1 to 7"),
    ([7], 2, r"2 distinct sets of size 7 were asked for, but the 7 other tasks form only 1; ask for at most 1"),
    ([1, 1], 1, "must be distinct set sizes"),
    ([1], 0, "sets_per_size=0 must be a positive integer"),
])
def test_bad_requests_name_the_valid_range(sizes, per_size, message):
    with pytest.raises(ValueError, match=message):
        conflict_study.draw_aux_sets("t0", POOL, sizes, per_size)


def _runs(conflicts, scores, sharp):
    """Combined runs of target `a` with hand-made values: conflict constant per run over trained epochs (NaN at 0)."""
    n, epochs = len(conflicts), 4
    tasks = [json.dumps(["a"])] + [json.dumps(["a"] + [f"x{j}" for j in range(i)]) for i in range(1, n)]
    conflict = np.array([[np.nan] + [c] * (epochs - 1) for c in conflicts])[:, :, None]
    test = np.array([[0.1] + [s] * (epochs - 1) for s in scores])[:, :, None]
    base = np.full((n, epochs, 1), np.nan)
    data = {"conflict": conflict, "val_score": test, "test_score": test, "sharpness": base.copy(),
            "fisher_trace": base.copy(), "grad_cov_trace": base.copy(), "train_loss": np.ones((n, epochs, 1))}
    data["sharpness"][:, 1:, 0] = np.asarray(sharp)[:, None]
    ds = xr.Dataset({k: (("run", "epoch", "task"), v) for k, v in data.items()},
                    coords={"run": [f"r{i}" for i in range(n)], "epoch": np.arange(epochs), "task": ["a"],
                            "tasks": ("run", tasks), "seed": ("run", [0] * n), "status": ("run", ["complete"] * n)})
    return ds


def test_run_summary_means_the_trained_conflict_and_names_the_set():
    conflicts = [np.nan, 0.9, 0.5, 0.7]
    runs = _runs(conflicts, [0.8, 0.7, 0.6, 0.75], [1.0, 2.0, 3.0, 2.5])
    sets = [conflict_study.AuxSet("a", 1, 0, ("x0",))]
    summary = conflict_study.run_summary(runs, "a", sets)
    assert summary["size"].tolist() == [0, 1, 2, 3]
    assert summary["draw"].tolist() == [-1, 0, -1, -1]
    np.testing.assert_allclose(summary["conflict"], conflicts)
    np.testing.assert_allclose(summary["generalization"], [0.8, 0.7, 0.6, 0.75])
    np.testing.assert_allclose(summary["sharpness"], [1.0, 2.0, 3.0, 2.5])
    # At comparable loss (every checkpoint here has loss 1: the bands hold them all): the same trained means.
    at_loss = conflict_study.run_summary(runs, "a", sets, loss_bins={"n_bins": 4, "skip_highest": 1, "early_width": 2})
    np.testing.assert_allclose(at_loss["sharpness_at_loss"], [1.0, 2.0, 3.0, 2.5])
    assert at_loss["fisher_trace_at_loss"].isna().all()  # never measured


def test_correlation_table_matches_scipy_per_group():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"target": ["a"] * 9 + ["b"] * 7, "conflict": rng.normal(size=16),
                          "sharpness": rng.normal(size=16), "generalization": rng.normal(size=16)})
    frame.loc[3, "sharpness"] = np.nan  # left out of that pair only
    table = conflict_study.correlation_table(frame, ["sharpness", "generalization"])
    for target in ("a", "b"):
        group = frame[frame["target"] == target]
        for quantity in ("sharpness", "generalization"):
            ok = group[["conflict", quantity]].dropna()
            row = table.loc[(target, quantity)]
            pearson, spearman = stats.pearsonr(ok["conflict"], ok[quantity]), stats.spearmanr(ok["conflict"], ok[quantity])
            assert row["n"] == len(ok)
            assert row["pearson_r"] == pytest.approx(pearson.statistic) and row["pearson_p"] == pytest.approx(pearson.pvalue)
            assert row["spearman_rho"] == pytest.approx(spearman.statistic)
            assert row["spearman_p"] == pytest.approx(spearman.pvalue)
    assert table.loc[("a", "sharpness"), "n"] == 8


def test_correlation_table_of_exact_relations_and_unknown_columns():
    frame = pd.DataFrame({"target": "a", "conflict": [0.1, 0.2, 0.3, 0.4, 0.5],
                          "sharpness": [9.0, 7.0, 5.0, 3.0, 1.0], "generalization": [1.0, 8.0, 27.0, 64.0, 125.0]})
    table = conflict_study.correlation_table(frame, ["sharpness", "generalization"])
    assert table.loc[("a", "sharpness"), "pearson_r"] == pytest.approx(-1.0)
    assert table.loc[("a", "generalization"), "spearman_rho"] == pytest.approx(1.0)
    assert table.loc[("a", "generalization"), "pearson_r"] < 1.0
    with pytest.raises(ValueError, match=r"columns \['fisher'\] are not in the summary"):
        conflict_study.correlation_table(frame, ["fisher"])


def test_finding_reads_the_signs_and_p_values():
    rows = {("a", "sharpness"): (-0.9, 0.001), ("a", "generalization"): (0.1, 0.7),
            ("b", "sharpness"): (-0.8, 0.01), ("b", "generalization"): (0.2, 0.5)}
    table = pd.DataFrame([{"target": g, "quantity": q, "spearman_rho": r, "spearman_p": p}
                          for (g, q), (r, p) in rows.items()]).set_index(["target", "quantity"])
    assert conflict_study.finding(table, ["sharpness"]).agrees_with_paper
    table.loc[("b", "generalization"), "spearman_p"] = 0.01
    result = conflict_study.finding(table, ["sharpness"])
    assert not result.agrees_with_paper and result.generalization_follows == ["b"]
    table.loc[("b", "sharpness"), "spearman_rho"] = 0.8  # grows the other way for b
    mixed = conflict_study.finding(table, ["sharpness"])
    assert mixed.factors_follow_conflict == [] and mixed.factors_opposite == []
    table.loc[("a", "sharpness"), "spearman_rho"] = 0.9  # shrinks with the conflict for both
    opposite = conflict_study.finding(table, ["sharpness"])
    assert opposite.factors_opposite == ["sharpness"] and "shrink with it (ρ > 0, p < 0.05): sharpness" in opposite.text


def _notebook_defaults(name):
    import ast

    import jupytext

    from mtlcore.book import PROJECT_ROOT

    cell = next(c for c in jupytext.read(PROJECT_ROOT / "notebooks" / f"{name}.py").cells
                if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_every_run_of_a_profile_is_a_valid_config(profile):
    """The §5 chapter's runs in each profile: its sets drawn, every run config validated (nothing trains)."""
    from mtlcore import settings
    from mtlcore.book import profile_parameters
    from mtlcore.training import RunConfig, base_config
    p = {**_notebook_defaults("sec5_conflict"), **profile_parameters(profile)["sec5_conflict"]}
    pool = p["pool"] or list(settings.get(p["setting"]).tasks)
    assert len(p["set_sizes"]) >= 2 and "conflict" in p["metrics"]["factors"]
    for target in p["targets"]:
        for aux in conflict_study.draw_aux_sets(target, pool, p["set_sizes"], p["sets_per_size"], seed=p["draw_seed"]):
            for seed in p["seeds"]:
                config = RunConfig.from_dict(base_config(p) | {"tasks": aux.run_tasks, "seed": seed})
                assert config.mode == "mtl" and config.tasks[0] == target
    if profile == "quick":
        assert p["setting"] == "fashion_pool" and len(p["set_sizes"]) >= 3 and p["analog"]
    if profile == "paper":  # the paper's study: CIFAR-100 targets (Fish among them) on a GPU, not an analog
        assert p["setting"] == "cifar100" and "fish" in p["targets"] and not p["analog"]
        assert p["device"] == "cuda" and p["metrics"]["every"] == 1 and p["epochs"] >= 20
