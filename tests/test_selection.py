"""Choosing the training configuration on validation: ranks against a brute-force count, the grid's checks, and a
real selection whose choice is recomputed from the run files."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import SMALL

from mtlcore.training import load_run, run_path
from mtlcore.training.config import ConfigError, RunConfig
from mtlcore.training.selection import (
    check_selection,
    describe,
    grid_points,
    method_grid,
    rank_points,
    select,
)


def brute_force_ranks(scores: np.ndarray, higher_is_better: np.ndarray) -> np.ndarray:
    """Rank of each point in each cell: 1 + (points strictly better) + (points tied, other than itself) / 2, a NaN
    counted worse than any number and tied with the other NaNs."""
    n, cells = scores.shape
    ranks = np.zeros_like(scores, dtype=float)
    for c in range(cells):
        for i in range(n):
            better = tied = 0
            for j in range(n):
                if j == i:
                    continue
                a, b = scores[i, c], scores[j, c]
                if np.isnan(a) and np.isnan(b):
                    tied += 1
                elif np.isnan(b):
                    continue
                elif np.isnan(a) or (b > a if higher_is_better[c] else b < a):
                    better += 1
                elif a == b:
                    tied += 1
            ranks[i, c] = 1 + better + tied / 2
    return ranks


def test_ranks_follow_each_cells_direction_and_put_failures_last():
    rng = np.random.default_rng(0)
    scores = rng.choice([0.1, 0.5, 0.9, np.nan], size=(5, 7))
    directions = np.array([True, False, True, True, False, False, True])
    np.testing.assert_array_equal(rank_points(scores, directions), brute_force_ranks(scores, directions))
    ranks = rank_points(np.array([[0.9, 3.0], [0.8, 1.0], [np.nan, np.nan]]), np.array([True, False]))
    np.testing.assert_array_equal(ranks, [[1, 2], [2, 1], [3, 3]])  # accuracy up, error down, diverged last


def test_the_grid_is_every_combination_in_order_and_bad_grids_are_named():
    points = grid_points({"lr": [0.1, 0.01], "optimizer": ["adam", "sgd"]})
    assert points == [dict(zip(("lr", "optimizer"), v)) for v in itertools.product([0.1, 0.01], ["adam", "sgd"])]
    with pytest.raises(ConfigError, match=r"unknown run-config field\(s\) \['learning_rate'\]; valid fields: .*'lr'"):
        grid_points({"learning_rate": [0.1]})
    with pytest.raises(ConfigError, match=r"cannot vary \['seed'\]"):
        grid_points({"seed": [0, 1]})
    with pytest.raises(ConfigError, match=r"\['lr'\] must be non-empty lists"):
        grid_points({"lr": 0.1})
    listed = [{"optimizer": "adam", "lr": 0.001}, {"optimizer": "momentum", "lr": 0.01}]
    assert grid_points(listed) == listed  # a list of points: those points, in their order
    with pytest.raises(ConfigError, match=r"unknown run-config field\(s\) \['learning_rate'\]"):
        grid_points([{"optimizer": "adam", "learning_rate": 0.001}])
    with pytest.raises(ConfigError, match=r"more than once"):
        grid_points([{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.1}])
    with pytest.raises(ConfigError, match=r"holds points"):
        grid_points([{"lr": 0.1}, 0.01])
    with pytest.raises(ConfigError, match=r"a list of points is for `selection:` only"):
        method_grid(listed, "cagrad")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['seed'\]; valid keys: \['grid', 'seeds', 'task_sets'\]"):
        check_selection({"grid": {"lr": [0.1]}, "seed": [0]})
    with pytest.raises(ConfigError, match="task_sets"):
        check_selection({"grid": {"lr": [0.1]}, "task_sets": ["fashion1"]})


def test_a_selection_chooses_the_point_that_validates_best(fake_data_root, tmp_path):
    base = {"setting": "fashion_mtl", "setting_options": SMALL, "epochs": 2, "batch_size": 32, "optimizer": "momentum",
            "device": "cpu", "metrics": {"factors": ["sharpness"], "examples": 32}}
    task_sets = [["fashion1"], ["fashion1", "fashion2"]]
    spec = {"grid": {"lr": [1e-6, 0.05, 1e6]}, "seeds": [0]}  # hardly moves; learns; diverges
    selection = select(base, spec, task_sets, tmp_path, data_root=fake_data_root, progress=False)
    assert selection.runs == 6 and selection.chosen == {"lr": 0.05}
    table = selection.table
    assert table["chosen"].tolist() == ["", "✔", ""] and table["diverged runs"].tolist() == [0, 0, 2]
    # recomputed from the run files: the best validation score of each (task set, task) cell, ranked
    scores = np.full((3, 3), np.nan)
    cells = [(json.dumps(ts), task) for ts in task_sets for task in ts]
    for p, lr in enumerate(spec["grid"]["lr"]):
        for ts in task_sets:
            config = RunConfig.from_dict({**base, "metrics": {}, "lr": lr, "tasks": ts, "seed": 0})
            ds = load_run(run_path(config, tmp_path))
            assert ds.attrs["config"] and not json.loads(ds.attrs["config"])["metrics"]  # no factor measured
            for task in ts:
                if ds.attrs["status"] == "complete":
                    scores[p, cells.index((json.dumps(ts), task))] = np.nanmax(ds["val_score"].sel(task=task).values[1:])
    np.testing.assert_allclose(table["mean rank"], brute_force_ranks(scores, np.ones(3, bool)).mean(axis=1))
    assert "`lr` = 0.05" in describe(selection) and "3 grid points, 6 runs" in describe(selection)
    again = select(base, {**spec, "task_sets": [["fashion1"]]}, task_sets, tmp_path, data_root=fake_data_root,
                   progress=False)  # explicit task sets replace the experiment's; the runs are on disk
    assert again.runs == 3 and again.chosen == {"lr": 0.05}
    listed = select(base, {"grid": [{"lr": 1e6}, {"lr": 0.05}]}, task_sets, tmp_path, data_root=fake_data_root,
                    progress=False)  # two of the points, listed: their runs are on disk
    assert listed.runs == 4 and listed.chosen == {"lr": 0.05} and listed.table["lr"].tolist() == [1e6, 0.05]
    np.testing.assert_allclose(listed.table["mean rank"],
                               brute_force_ranks(scores[[2, 1]], np.ones(3, bool)).mean(axis=1))
