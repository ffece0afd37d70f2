"""The settings a profile runs besides FashionMTL's target-and-partner design (paper A, Table 1): every task of the
setting trained together (MTL) against each target task trained alone (STL), over seeds.

A profile lists them as `studies` (one mapping each: the setting, its tasks and targets, its run-config values, its
seeds, where its data comes from, an optional validation-selected grid). Before anything trains, `prepare` decides
whether a study can run here and says why not when it cannot: a setting this version does not have, a GPU the
machine lacks, data files that are absent (with what to download and where to put it). `data: fixture` runs the
real loaders on small generated files in the released format (`Setting.write_fixture`): it proves the pipeline and
says nothing about the data set, and the chapters say so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from mtlcore import settings
from mtlcore.analysis import comparisons, published
from mtlcore.settings.locate import DataNotFoundError
from mtlcore.training.config import ConfigError, RunConfig
from mtlcore.training.runner import grid, load_runs
from mtlcore.training.selection import Selection, check_selection, select

# Paper A's five settings (Appendix A), in its order; names the registry may not have yet.
PAPER_SETTINGS = {"fashion_mtl": "FashionMTL", "cifar100": "CIFAR-100", "celeba": "CelebA",
                  "cityscapes": "Cityscapes", "glue": "GLUE"}
DATA_SOURCES = ("root", "fixture")
STUDY_KEYS = ("setting", "tasks", "targets", "seeds", "data", "selection", "aggregators")
FIXTURE_FOLDER = "fixture-data"


@dataclass(frozen=True)
class Study:
    setting: str
    tasks: tuple[str, ...]  # trained together (MTL)
    targets: tuple[str, ...]  # each also trained alone (STL) and compared
    seeds: tuple[int, ...]
    data: str  # "root": the data root; "fixture": generated files in the released format
    config: dict  # the run-config values its runs share
    selection: dict = field(default_factory=dict)
    aggregators: tuple[str, ...] | None = None  # §4.2's SMTOs for it: None, the chapter's; () none

    @classmethod
    def from_dict(cls, spec: dict) -> Study:
        """A study from its profile entry; unknown keys, tasks and data sources are refused, naming the valid ones.
        Settings this version does not have are kept (`prepare` reports them), their names checked against the
        paper's."""
        if not isinstance(spec, dict) or "setting" not in spec:
            raise ConfigError(f"a study needs at least `setting:`, got {spec!r}")
        run_fields = [f for f in RunConfig.fields() if f not in ("tasks", "seed")]
        unknown = sorted(set(spec) - set(STUDY_KEYS) - set(run_fields))
        if unknown:
            raise ConfigError(f"study of {spec['setting']!r}: unknown key(s) {unknown}; valid keys: "
                              f"{sorted(set(STUDY_KEYS) | set(run_fields))}")
        name = spec["setting"]
        if name not in settings.available() and name not in PAPER_SETTINGS:
            raise ConfigError(f"unknown setting {name!r}; valid settings: {sorted(set(settings.available()) | set(PAPER_SETTINGS))}")
        data = spec.get("data", "root")
        if data not in DATA_SOURCES:
            raise ConfigError(f"study of {name!r}: data={data!r}; valid: {list(DATA_SOURCES)}")
        known = settings.get(name).tasks if name in settings.available() else None
        tasks = tuple(spec.get("tasks") or known or ())
        targets = tuple(spec.get("targets") or tasks)
        if known is not None:
            settings.get(name).check_tasks(list(tasks))
        if len(tasks) < 2:
            raise ConfigError(f"study of {name!r}: MTL needs at least two tasks, got tasks={list(tasks)}")
        outside = [t for t in targets if t not in tasks]
        if outside:
            raise ConfigError(f"study of {name!r}: targets {outside} are not among its tasks {list(tasks)}")
        seeds = spec.get("seeds", [0, 1, 2])
        if not isinstance(seeds, list) or not seeds:
            raise ConfigError(f"study of {name!r}: seeds={seeds!r} must be a non-empty list")
        selection = spec.get("selection") or {}
        if selection:
            check_selection(selection)
        aggregators = spec.get("aggregators")
        if aggregators is not None:
            from mtlcore import aggregators as registry

            if not isinstance(aggregators, list):
                raise ConfigError(f"study of {name!r}: aggregators={aggregators!r} must be a list (empty: none)")
            unknown = [a for a in aggregators if a not in registry.available()]
            if unknown:
                raise ConfigError(f"study of {name!r}: unknown aggregator(s) {unknown}; valid: {registry.available()}")
            aggregators = tuple(aggregators)
        config = {k: v for k, v in spec.items() if k in run_fields}
        return cls(name, tasks, targets, tuple(seeds), data, config, selection, aggregators)

    @property
    def display_name(self) -> str:
        return settings.get(self.setting).display_name if self.setting in settings.available() else PAPER_SETTINGS[self.setting]

    def task_sets(self) -> list[list[str]]:
        return [[t] for t in self.targets] + [list(self.tasks)]

    def configs(self, chosen: dict | None = None) -> list[RunConfig]:
        """Every run of the study (each target alone, all tasks together; every seed), with `chosen` values
        (a selection's) over its own."""
        return grid({**self.config, **(chosen or {})}, tasks=self.task_sets(), seed=list(self.seeds))


@dataclass(frozen=True)
class StudyStatus:
    study: Study
    ran: bool
    reason: str  # markdown: what ran on what data, or why nothing did
    data_root: str | None = None


def _gpu_needed(study: Study) -> bool:
    import torch

    return str(study.config.get("device", "auto")).startswith("cuda") and not torch.cuda.is_available()


def prepare(study: Study, data_root: str | Path | None, results_dir: str | Path) -> StudyStatus:
    """Whether `study` can run here, and on which data root (fixture files are written on first use)."""
    name = study.setting
    if name not in settings.available():
        return StudyStatus(study, False, f"not run: this version of mtlcore has no {study.display_name} setting yet")
    if _gpu_needed(study):
        return StudyStatus(study, False, f"not run: the profile runs it on a GPU (device: {study.config['device']}) "
                                         "and this machine has none")
    setting = settings.get(name)
    if study.data == "fixture":
        root = Path(results_dir) / FIXTURE_FOLDER / name
        marker = root / ".written"
        if not marker.exists():
            root.mkdir(parents=True, exist_ok=True)
            setting.write_fixture(root)
            marker.write_text("files written by Setting.write_fixture\n")
        return StudyStatus(study, True, "ran on **generated fixture files** in the released format (the real loaders "
                                        "read them): this proves the pipeline and says nothing about "
                                        f"{study.display_name}", str(root))
    root = settings.data_root(data_root)
    one = {key: 1 for key in ("train_size", "val_size", "test_size") if key in setting.defaults}
    options = {**study.config.get("setting_options", {}), **one}
    try:
        setting.load(list(study.tasks), options, root=root, download=False)
    except DataNotFoundError as error:
        message = str(error).replace(str(root), "<data root>")  # no machine path in the book
        return StudyStatus(study, False, "not run: the data is absent.\n\n```text\n" + message + "\n```\n\n"
                                         f"Then run `mtlcore data {name}` to check the files.")
    return StudyStatus(study, True, "ran on the real data", str(root))


def overview(statuses: list[StudyStatus], fashion_mtl: str) -> pd.DataFrame:
    """One row per setting of paper A: whether this profile ran it and on what data, or why not. `fashion_mtl`
    describes the chapter's FashionMTL part."""
    by_setting = {s.study.setting: s for s in statuses}
    rows = []
    for name, display in PAPER_SETTINGS.items():
        if name == "fashion_mtl":
            rows.append({"setting": display, "in this profile": fashion_mtl})
        elif name in by_setting:
            status = by_setting[name]
            first = status.reason.split("\n")[0]
            rows.append({"setting": display, "in this profile": first})
        else:
            rows.append({"setting": display, "in this profile": "not run: the profile does not list it"})
    return pd.DataFrame(rows).set_index("setting")


def run(status: StudyStatus, results_dir: str | Path, *, aggregators: list[str] | None = None,
        **load_kwargs) -> tuple[xr.Dataset, Selection | None]:
    """Train (or read) a runnable study's runs, after its validation selection when it has one: each target alone and
    all tasks together, or with `aggregators` all tasks together under the uniform gradient and each of them (§4.2).
    `load_kwargs` go to `load_runs` (executor, progress)."""
    study = status.study
    kwargs = {"data_root": status.data_root, **load_kwargs}
    selection = select(study.config, study.selection, study.task_sets(), results_dir, **kwargs) if study.selection else None
    chosen = selection.chosen if selection else {}
    if aggregators is None:
        configs = study.configs(chosen)
    else:
        configs = grid({**study.config, **chosen}, tasks=[list(study.tasks)], aggregator=["uniform", *aggregators],
                       seed=list(study.seeds))
    return load_runs(configs, results_dir, **kwargs), selection


def overview_markdown(statuses: list[StudyStatus], fashion_mtl: str) -> str:
    """`overview` as markdown, followed by what to download for each study that lacked its data."""
    parts = [markdown(overview(statuses, fashion_mtl))]
    parts += [f"**{s.study.display_name}** {s.reason}" for s in statuses if not s.ran and "\n" in s.reason]
    return "\n\n".join(parts)


def markdown(table: pd.DataFrame) -> str:
    """A small table as markdown, so that the cells' own markdown (bold, code) renders in the book."""
    columns = [table.index.name or "", *table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in (index, *row)) + " |" for index, row in zip(table.index, table.to_numpy())]
    return "\n".join(lines)


# --- analysis -----------------------------------------------------------------------------------------------------


def target_runs(runs: xr.Dataset, study: Study, target: str) -> xr.Dataset:
    """The runs of `target` alone ("STL") and of all tasks together ("MTL"), its values only, labelled."""
    alone, together = json.dumps([target]), json.dumps(list(study.tasks))
    tasks = [json.dumps(json.loads(t)) for t in runs["tasks"].values]
    keep = [i for i, t in enumerate(tasks) if t in (alone, together)]
    chosen = runs.isel(run=keep).sel(task=target)
    labels = ["STL" if tasks[i] == alone else "MTL" for i in keep]
    return chosen.assign_coords(configuration=("run", labels))


def target_table(runs: xr.Dataset, study: Study, variables: list[str] = ()) -> pd.DataFrame:
    """Per target: STL and MTL means, Δ = MTL − STL of generalization (positive: better) and of each factor
    variable (MTL − STL), ±2 std significance, and paper A's published Δ where Table 1 gives one and the study ran
    on the real data (on fixture files there is nothing to compare)."""
    quantities = ["generalization", *variables]
    rows = []
    for target in study.targets:
        sub = target_runs(runs, study, target)
        table = comparisons.delta_table(comparisons.trajectory_summaries(sub)[quantities], sub["configuration"])
        row = table.loc["MTL"].to_dict()
        row.update(stl_generalization=table.loc["STL", "generalization"],
                   stl_generalization_std=table.loc["STL", "generalization_std"],
                   score=str(sub["primary_score"].values), task=target)
        paper = published.table1_delta(study.setting, target)
        comparable = paper is not None and row["score"] == published.TABLE1_SCORE and study.data != "fixture"
        row["paper_delta_points"] = paper if comparable else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def curve_targets(table: pd.DataFrame, limit: int = 8) -> list[str]:
    """The targets to draw against their training loss (paper A's Figure 2 shows those with significant transfer):
    the significant ones first, then the others, each by decreasing |Δ|, at most `limit`."""
    order = table.assign(size=table["delta_generalization"].abs(), sig=table["significant_generalization"].astype(bool))
    return list(order.sort_values(["sig", "size"], ascending=False).index[:limit])


def display_scale(study: Study, tasks) -> np.ndarray:
    """Per task, the factor from its primary score to the unit shown: 100 for a rate (percentage points), else 1."""
    setting = settings.get(study.setting)
    return np.array([100.0 if setting.task(t).primary.percent else 1.0 for t in tasks])


def table_dataset(table: pd.DataFrame, study: Study) -> xr.Dataset:
    """`target_table` as a netCDF-safe dataset: dimension `<setting>_task`, variables prefixed by the setting."""
    frame = table.drop(columns=["score"])
    frame.index.name = f"{study.setting}_task"
    return comparisons.table_dataset(frame, study.setting)


def shown_table(table: pd.DataFrame, study: Study, variables: list[str] = ()) -> pd.DataFrame:
    """`target_table` as the chapters print it: rates in percentage points (as the paper writes accuracy), ✱ for
    a significant Δ."""
    setting = settings.get(study.setting)
    scale = display_scale(study, table.index)
    out = pd.DataFrame(index=[setting.display_names.get(t, t) for t in table.index])
    out.index.name = "task"
    out["score"] = table["score"].values
    out["STL"] = [f"{m * s:.2f} ± {d * s:.2f}" for m, d, s in zip(table["stl_generalization"], table["stl_generalization_std"], scale)]
    out["MTL"] = [f"{m * s:.2f} ± {d * s:.2f}" for m, d, s in zip(table["generalization"], table["generalization_std"], scale)]
    out["Δ (ours)"] = [f"{d * s:+.2f}" + (" ✱" if sig else "")
                       for d, s, sig in zip(table["delta_generalization"], scale, table["significant_generalization"])]
    out["Δ (paper A)"] = ["" if np.isnan(p) else f"{p:+.2f}" for p in table["paper_delta_points"]]
    for v in variables:
        out[f"Δ {v}"] = [f"{d:+.3g}" + (" ✱" if sig else "") for d, sig in zip(table[f"delta_{v}"], table[f"significant_{v}"])]
    return out
