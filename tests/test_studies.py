"""The settings a profile runs besides FashionMTL: checking a study, deciding whether it can run here, and its
per-task Table 1 against a brute-force recomputation from the run files."""
from __future__ import annotations

import dataclasses
import json

import matplotlib
import numpy as np
import pytest
import torch

from mtlcore import settings
from mtlcore.analysis import plots, published, studies
from mtlcore.book import NOTEBOOKS, declared_parameters, profile_parameters, profiles
from mtlcore.training.config import ConfigError

matplotlib.use("Agg")

CIFAR = {"setting": "cifar100", "data": "fixture", "tasks": ["aquatic_mammals", "fish", "fruit_and_vegetables"],
         "targets": ["fish", "fruit_and_vegetables"], "setting_options": {"train_size": 20, "val_size": 10, "test_size": 12},
         "model_options": {"width": 2}, "seeds": [0, 1], "epochs": 2, "batch_size": 10, "lr": 0.01, "device": "cpu",
         "metrics": {"factors": ["sharpness"], "examples": 16, "sharpness": {"steps": 2, "batch_size": 8}}}


# -- checking a study ---------------------------------------------------------------------------------------
def test_a_study_defaults_to_every_task_and_refuses_what_it_cannot_run():
    study = studies.Study.from_dict({"setting": "celeba"})
    assert study.tasks == settings.get("celeba").tasks and study.targets == study.tasks and study.seeds == (0, 1, 2)
    assert study.task_sets()[-1] == list(study.tasks) and len(study.task_sets()) == 41
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['target'\]; valid keys: .*'targets'"):
        studies.Study.from_dict({"setting": "cifar100", "target": ["fish"]})
    with pytest.raises(ConfigError, match=r"unknown setting 'cifar10'; valid settings: .*'cifar100'"):
        studies.Study.from_dict({"setting": "cifar10"})
    with pytest.raises(ConfigError, match=r"targets \['people'\] are not among its tasks"):
        studies.Study.from_dict({"setting": "cifar100", "tasks": ["fish", "trees"], "targets": ["people"]})
    with pytest.raises(ConfigError, match="at least two tasks"):
        studies.Study.from_dict({"setting": "cifar100", "tasks": ["fish"]})
    with pytest.raises(ValueError, match="unknown task"):
        studies.Study.from_dict({"setting": "cifar100", "tasks": ["fish", "dolphins"]})
    with pytest.raises(ConfigError, match=r"data='download'; valid: \['root', 'fixture'\]"):
        studies.Study.from_dict({"setting": "cifar100", "data": "download"})
    with pytest.raises(ConfigError, match="selection"):
        studies.Study.from_dict({"setting": "cifar100", "selection": {"grid": {"rate": [1]}}})


PAPER_A_CHAPTERS = ("sec3_transfer", "sec4_1_factors", "sec4_2_smtos")


def test_every_profile_passes_its_studies_to_the_chapters_that_take_them():
    assert all("studies" in declared_parameters(name) for name in PAPER_A_CHAPTERS)
    for profile in profiles():
        parameters = profile_parameters(profile)
        taking = [name for name in NOTEBOOKS if "studies" in declared_parameters(name)]
        assert all(parameters[name]["studies"] == parameters["sec3_transfer"]["studies"] for name in taking)
        names = [studies.Study.from_dict(s).setting for s in parameters["sec3_transfer"]["studies"]]
        assert {"cifar100", "celeba", "cityscapes"} <= set(names)
        selections = [json.dumps(parameters[name].get("selection"), sort_keys=True) for name in PAPER_A_CHAPTERS]
        assert len(set(selections)) == 1  # the paper-A chapters choose the same configuration


# -- whether a study runs here ------------------------------------------------------------------------------
def test_absent_data_says_what_to_get_without_a_machine_path(tmp_path):
    status = studies.prepare(studies.Study.from_dict({"setting": "cifar100"}), tmp_path, tmp_path / "results")
    assert not status.ran and status.reason.startswith("not run: the data is absent")
    assert "cifar-100-python" in status.reason and "<data root>" in status.reason and str(tmp_path) not in status.reason
    page = studies.overview_markdown([status], fashion_mtl="ran")
    assert "| CIFAR-100 | not run: the data is absent. |" in page and "**CIFAR-100** not run" in page
    assert "cifar-100-python" in page and str(tmp_path) not in page


def test_a_gpu_study_on_a_machine_without_one_is_not_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status = studies.prepare(studies.Study.from_dict({"setting": "cifar100", "device": "cuda"}), tmp_path, tmp_path)
    assert not status.ran and "GPU" in status.reason


def test_a_paper_setting_this_version_lacks_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(studies.settings, "available", lambda: ["fashion_mtl", "cifar100", "celeba"])
    status = studies.prepare(studies.Study.from_dict({"setting": "glue", "tasks": ["cola", "sst2"]}), tmp_path, tmp_path)
    assert not status.ran and "no GLUE setting" in status.reason
    table = studies.overview([status], fashion_mtl="ran")
    assert list(table.index) == list(studies.PAPER_SETTINGS.values())
    assert table.loc["GLUE", "in this profile"].startswith("not run") and table.loc["FashionMTL", "in this profile"] == "ran"
    assert table.loc["CIFAR-100", "in this profile"] == "not run: the profile does not list it"


# -- the per-task table ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_study(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    study = studies.Study.from_dict(CIFAR)
    status = studies.prepare(study, None, results)
    assert status.ran and "fixture" in status.reason and (results / studies.FIXTURE_FOLDER / "cifar100").is_dir()
    runs, selection = studies.run(status, results, progress=False)
    assert selection is None and runs.sizes["run"] == 6
    return study, runs


def _generalization(val: np.ndarray, test: np.ndarray, k: int = 10) -> float:
    """Mean test score at the k best-validation trained checkpoints (epoch 0 left out), by hand."""
    val, test = val[1:], test[1:]
    best = np.argsort(-val, kind="stable")[:k]
    return float(test[best].mean())


def test_the_table_is_each_target_alone_against_all_together(fixture_study):
    study, runs = fixture_study
    table = studies.target_table(runs, study, ["sharpness"])
    assert list(table.index) == ["fish", "fruit_and_vegetables"]
    for target in study.targets:
        values = {"STL": [], "MTL": []}
        for i in range(runs.sizes["run"]):
            tasks = json.loads(str(runs["tasks"].values[i]))
            if tasks in ([target], list(study.tasks)):
                one = runs.isel(run=i).sel(task=target)
                values["STL" if len(tasks) == 1 else "MTL"].append(
                    _generalization(one["val_score"].values, one["test_score"].values))
        assert len(values["STL"]) == len(values["MTL"]) == 2
        mtl, stl = np.mean(values["MTL"]), np.mean(values["STL"])
        row = table.loc[target]
        np.testing.assert_allclose([row["generalization"], row["stl_generalization"], row["delta_generalization"]],
                                   [mtl, stl, mtl - stl])
        sds = np.std(values["MTL"], ddof=1), np.std(values["STL"], ddof=1)
        assert bool(row["significant_generalization"]) == (abs(mtl - stl) > 2 * (sds[0] + sds[1]))
        assert np.isnan(row["paper_delta_points"])  # fixture files: nothing to compare with the paper
    real = studies.target_table(runs, dataclasses.replace(study, data="root"))
    assert real["paper_delta_points"].tolist() == [published.table1_delta("cifar100", t) for t in study.targets]
    shown = studies.shown_table(real, study, [])
    assert list(shown.index) == ["Fish", "Fruit and vegetables"] and shown["Δ (paper A)"].tolist() == ["+3.49", "-8.81"]
    assert shown["Δ (ours)"].iloc[0].startswith(f"{100 * real['delta_generalization'].iloc[0]:+.2f}")  # points
    ds = studies.table_dataset(table, study)
    assert ds.sizes["cifar100_task"] == 2 and "cifar100_delta_sharpness" in ds


def test_the_transfer_figure_draws_each_task_with_its_significance_whisker(fixture_study):
    study, runs = fixture_study
    table = studies.target_table(runs, dataclasses.replace(study, data="root"))
    fig = plots.transfer_by_task(table, ["Fish", "Fruit"], [100.0, 100.0], title="t")
    ax = fig.axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    np.testing.assert_allclose(widths[::-1][::-1], 100 * table["delta_generalization"].to_numpy())
    whisker = ax.collections[0].get_segments()  # the error bars, one segment per task
    half = 2 * (table["generalization_std"] + table["stl_generalization_std"]).to_numpy() * 100
    np.testing.assert_allclose([abs(s[1][0] - s[0][0]) / 2 for s in whisker], half)
    markers = ax.collections[1].get_offsets()[:, 0]
    np.testing.assert_allclose(markers, [3.49, -8.81])
    matplotlib.pyplot.close(fig)


def test_the_curves_show_significant_targets_first_and_draw_each_panel(fixture_study):
    study, runs = fixture_study
    table = studies.target_table(runs, study)
    flipped = table.assign(significant_generalization=[False, True], delta_generalization=[0.5, -0.01])
    assert studies.curve_targets(flipped) == ["fruit_and_vegetables", "fish"]
    assert studies.curve_targets(flipped, limit=1) == ["fruit_and_vegetables"]
    panels = [(t, studies.target_runs(runs, study, t)) for t in study.targets]
    fig = plots.generalization_grid(panels, group="configuration", order=["STL", "MTL"], columns=4)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == list(study.targets)
    assert all(len(ax.get_lines()) == 2 for ax in visible)  # STL and MTL
    matplotlib.pyplot.close(fig)
