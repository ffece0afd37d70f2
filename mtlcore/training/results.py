"""The run dataset (the contract between training and analysis): build, validate, save, combine.

Dims `epoch` (0 = before training), `task` and `score`. Per (epoch, task): the losses, the primary score of each
task (`val_score`, `test_score`; its name and direction are the task coordinates `primary_score` and
`higher_is_better`), the trajectory factors and the task weights; per (epoch, task, score): every score of the
task (`val_scores`, `test_scores`; NaN for a score the task does not have).
"""
from __future__ import annotations

import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

# Per (epoch, task) float variables; NaN where not measured.
VARIABLES = ("train_loss", "val_loss", "test_loss", "val_score", "test_score", "sharpness", "fisher_trace",
             "grad_cov_trace", "grad_norm_sq", "conflict", "task_weight", "conflict_to_mean")
# Per-epoch variables of the multi-task gradient (MTL runs with the coherence factor).
EPOCH_VARIABLES = ("multitask_grad_cov_trace", "multitask_grad_norm_sq")
# Per (epoch, task, score): every score of every task.
SCORE_VARIABLES = ("val_scores", "test_scores")
# long_name and units of each variable (CF conventions), written into every run file.
LOSS_UNITS = "the task's loss (cross-entropy in nats for classification)"
VARIABLE_ATTRS = {
    "train_loss": ("training loss over the whole training split", LOSS_UNITS),
    "val_loss": ("validation loss", LOSS_UNITS),
    "test_loss": ("test loss", LOSS_UNITS),
    "val_score": ("validation score (the task's primary score)", "the score's; see primary_score, score_percent"),
    "test_score": ("test score (the task's primary score)", "the score's; see primary_score, score_percent"),
    "sharpness": ("sharpness: worst-case loss increase in an adaptive l-inf ball (paper A, Eq. 3)", LOSS_UNITS),
    "fisher_trace": ("trace of the Fisher information matrix (paper A, Eq. 5)", "squared loss gradient"),
    "grad_cov_trace": ("trace of the per-example gradient covariance (paper A, Eq. 4)", "squared loss gradient"),
    "grad_norm_sq": ("squared norm of the full-data loss gradient (paper A, Eq. 4)", "squared loss gradient"),
    "conflict": ("gradient conflict of the task with the applied update (paper A, Eq. 6)", "1 (a cosine-based ratio)"),
    "task_weight": ("mean weight of the task in the epoch's updates", "1"),
    "conflict_to_mean": ("cosine of the task's gradient with the mean task gradient (paper B's conflict measure "
                         "is its mean over the tasks)", "1"),
    "multitask_grad_cov_trace": ("trace of the gradient covariance of the uniform multi-task loss",
                                 "squared loss gradient"),
    "multitask_grad_norm_sq": ("squared norm of the uniform multi-task gradient", "squared loss gradient"),
    "val_scores": ("every validation score of the task", "the score's; see score_percent"),
    "test_scores": ("every test score of the task", "the score's; see score_percent"),
}
REQUIRED_ATTRS = ("run_id", "setting", "mode", "aggregator", "seed", "tasks", "config", "status")
STATUSES = ("complete", "diverged")
ENGINE = "h5netcdf"


def new_run_dataset(tasks: list[str], epochs: int, scores: dict[str, Sequence], attrs: dict) -> xr.Dataset:
    """An all-NaN run dataset for epochs 0..`epochs` (0 = before training); `scores[task]`: the task's `Score`s,
    its primary one first."""
    shape = (epochs + 1, len(tasks))
    names = list(dict.fromkeys(score.name for task in tasks for score in scores[task]))
    data = {name: (("epoch", "task"), np.full(shape, np.nan)) for name in VARIABLES}
    data.update({name: (("epoch",), np.full(epochs + 1, np.nan)) for name in EPOCH_VARIABLES})
    data.update({name: (("epoch", "task", "score"), np.full((*shape, len(names)), np.nan)) for name in SCORE_VARIABLES})
    coords = {"epoch": np.arange(epochs + 1), "task": list(tasks), "score": names,
              "step": ("epoch", np.zeros(epochs + 1, dtype=np.int64)),
              "primary_score": ("task", [scores[t][0].name for t in tasks]),
              "higher_is_better": ("task", np.array([int(scores[t][0].higher_is_better) for t in tasks]))}
    by_name = {score.name: score for task in tasks for score in scores[task]}
    coords["score_higher_is_better"] = ("score", np.array([int(by_name[n].higher_is_better) for n in names]))
    coords["score_percent"] = ("score", np.array([int(by_name[n].percent) for n in names]))
    from mtlcore.training.config import RESULTS_VERSION

    ds = xr.Dataset(data, coords=coords, attrs=_netcdf_attrs({**attrs, "results_version": RESULTS_VERSION}))
    for name, (long_name, units) in VARIABLE_ATTRS.items():
        ds[name].attrs.update(long_name=long_name, units=units)
    ds["epoch"].attrs.update(long_name="epoch (0: before training)", units="1")
    ds["higher_is_better"].attrs["long_name"] = "1 where a higher primary score is better"
    ds["score_higher_is_better"].attrs["long_name"] = "1 where a higher score is better"
    ds["score_percent"].attrs["long_name"] = "1 for a rate in [0, 1] that tables show in percentage points"
    return ds


def _netcdf_attrs(attrs: dict) -> dict:
    """netCDF attrs hold strings and numbers only: nested values, None and bools become JSON strings."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
        elif isinstance(value, str):
            out[key] = str(value)  # plain str: h5py refuses subclasses such as torch's version string
        elif isinstance(value, (int, float)):
            out[key] = value
        else:
            raise TypeError(f"attr {key}={value!r} ({type(value).__name__}) cannot be stored in netCDF; store a string or number")
    return out


def validate_run(ds: xr.Dataset) -> None:
    """Raise ValueError if `ds` does not follow the run schema."""
    problems = []
    if set(ds.dims) != {"epoch", "task", "score"}:
        problems.append(f"dims are {sorted(ds.dims)}, expected ['epoch', 'score', 'task']")
    missing = [v for v in (*VARIABLES, *SCORE_VARIABLES) if v not in ds.data_vars]
    if missing:
        problems.append(f"missing variables {missing}")
    missing_attrs = [a for a in REQUIRED_ATTRS if a not in ds.attrs]
    if missing_attrs:
        problems.append(f"missing attrs {missing_attrs}")
    missing_coords = [c for c in ("step", "primary_score", "higher_is_better") if c not in ds.coords]
    if missing_coords:
        problems.append(f"missing coordinate(s) {missing_coords}")
    if ds.attrs.get("status") not in STATUSES:
        problems.append(f"status={ds.attrs.get('status')!r}, expected one of {list(STATUSES)}")
    if problems:
        raise ValueError("not a valid run dataset: " + "; ".join(problems))


def save_atomic(ds: xr.Dataset, path: str | Path) -> Path:
    """Write `ds` to `path` so that a killed writer never leaves a file that reads as complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are owner-only (0600), which shared results folders cannot read.
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the usual mode, after the umask
    ds = ds.copy(deep=False)
    ds.attrs = _netcdf_attrs(ds.attrs)
    try:
        ds.to_netcdf(tmp, engine=ENGINE)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_name(path: Path) -> Path:
    """A name next to `path` that no other writer (process or thread) uses, for writing then `os.replace`."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def check_results_dir(results_dir: str | Path) -> Path:
    """Refuse a results folder (or its `runs/`) that exists as something other than a folder, before any training."""
    results_dir = Path(results_dir)
    for folder in (results_dir / "runs", results_dir, *results_dir.parents):
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            raise ValueError(f"results_dir {results_dir}: {folder} exists and is not a folder; give a folder path "
                             "(it is created when missing) or move the file away")
    return results_dir


# Run files read in this process, by (path, inode, modification time, size): a run file is only ever replaced whole
# (`save_atomic`), so the key changes with its content. Opening a netCDF file costs ~0.1 s; chapters read each run
# several times (the check for stale data, the selection, the tables).
_READ: OrderedDict = OrderedDict()
_READ_LOCK = threading.Lock()
READ_CACHE_SIZE = 2048


def load_run(path: str | Path, lazy: bool = False) -> xr.Dataset:
    """A run file in memory (a copy of its own: a caller may change it), or (`lazy`) as Dask arrays read when
    computed."""
    if lazy:
        return xr.open_dataset(path, engine=ENGINE, chunks={})
    return read_run(path).copy(deep=True)


def read_run(path: str | Path) -> xr.Dataset:
    """The run file in memory as this process read it, shared with later reads: only to look at, never to change
    (`load_run` gives a copy of one's own)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    with _READ_LOCK:
        ds = _READ.get(key)
        if ds is not None:
            _READ.move_to_end(key)
    if ds is None:
        with xr.open_dataset(path, engine=ENGINE) as opened:
            ds = opened.load()
        with _READ_LOCK:
            _READ[key] = ds
            while len(_READ) > READ_CACHE_SIZE:
                _READ.popitem(last=False)
    return ds


def run_attrs(path: str | Path) -> dict:
    """A run file's attributes alone, as `load_run(path).attrs` gives them, read without its variables: ~2 ms a file
    instead of ~0.1 s, for summaries over many runs."""
    import h5py

    with h5py.File(path, "r") as handle:
        items = [(name, value) for name, value in handle.attrs.items() if not name.startswith("_")]
    # netCDF stores a number as a one-element array and a string as a string
    return {name: value[0] if isinstance(value, np.ndarray) and value.shape == (1,) else value for name, value in items}


def run_config(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs["config"])


RUN_COORDS = ("run_id", "setting", "mode", "aggregator", "seed", "tasks", "status")


def combine_runs(runs: Iterable[xr.Dataset | str | Path], lazy: bool = False) -> xr.Dataset:
    """Stack runs along a `run` dimension; their attrs become coordinates along it (`config` too, as JSON).

    Runs with different task sets are outer-joined on `task` (NaN where a run lacks the task), and
    runs of different lengths on `epoch`. `lazy`: run files are opened as Dask arrays and nothing is read until
    computed (`.compute()`, `.load()`, or a reduction's result), so a thousand runs need not fit in memory.
    """
    datasets = [load_run(r, lazy=lazy) if isinstance(r, (str, Path)) else r for r in runs]
    if not datasets:
        raise ValueError("combine_runs needs at least one run")
    # step is per run: keep it as a variable so runs of other batch sizes still align on epoch.
    stacked = [ds.reset_coords("step").expand_dims("run") for ds in datasets]
    combined = xr.concat(stacked, dim="run", join="outer", combine_attrs="drop", data_vars="all",
                         coords="minimal", compat="override")
    names = list(dict.fromkeys([*RUN_COORDS, *(name for ds in datasets for name in ds.attrs)]))
    coords = {name: ("run", _attr_column(datasets, name)) for name in names}
    # each task's primary score and direction, from whichever run has the task (the outer join left NaN elsewhere)
    # and each score's direction and scale (runs of older versions lack these: -1 where no run says)
    for name, dim in (("primary_score", "task"), ("higher_is_better", "task"), ("score_higher_is_better", "score"),
                      ("score_percent", "score")):
        if any(name in ds.coords for ds in datasets):
            found = {k: v for ds in datasets if name in ds.coords for k, v in zip(ds[dim].values, ds[name].values)}
            coords[name] = (dim, np.array([found.get(k, -1) for k in combined[dim].values]))
    return combined.assign_coords(coords).assign_coords(run=[ds.attrs["run_id"] for ds in datasets])


def _attr_column(datasets: list[xr.Dataset], name: str) -> list:
    """One run attribute across runs (config included, so runs of a sweep can be told apart); a run
    without it gets NaN among numbers, else ""."""
    values = [ds.attrs.get(name) for ds in datasets]
    numeric = all(isinstance(v, (int, float, np.number)) for v in values if v is not None)
    return [(np.nan if numeric else "") if v is None else v for v in values]
