"""One executor for sweeps and notebooks: the spec, the cluster files, worker threads, and what run files record."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import xarray as xr

from mtlcore.training import ensure_runs, load_run, load_runs
from mtlcore.training.config import RESULTS_VERSION, ConfigError, RunConfig
from mtlcore.training.executor import ENV_VAR, Executor, job_script
from mtlcore.training.runner import RunsMissing

from conftest import SMALL
from test_train import assert_identical, config


def test_specs_parse_and_a_bad_one_lists_the_valid_forms(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Executor.parse(None).kind == Executor.parse("").kind == Executor.parse("local").kind == "sequential"
    assert Executor.parse("processes:3") == Executor("processes", workers=3)
    assert Executor.parse("tcp://10.0.0.5:8786") == Executor("scheduler", address="tcp://10.0.0.5:8786")
    monkeypatch.setenv(ENV_VAR, "processes:2")
    assert Executor.parse(None).workers == 2 and str(Executor.parse(None)) == "processes:2"
    for bad in ("processes:0", "cluster", "slurm"):
        with pytest.raises(ConfigError, match=r"not valid; use one of .*processes:N.*slurm:FILE"):
            Executor.parse(bad)
    with pytest.raises(ConfigError, match="no cluster file"):
        Executor.parse(f"slurm:{tmp_path / 'absent.yaml'}")


def test_worker_threads_share_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert [Executor.parse(f"processes:{n}").torch_threads() for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert Executor.parse("sequential").torch_threads() is None


@pytest.mark.parametrize("content, message", [
    ({"jobs": 2, "gpu": 1}, r"unknown key\(s\) \['gpu'\]; valid keys: .*'gpus'"),
    ({"jobs": 0}, r"jobs=0 must be an integer >= 1"),
    ({"cores": "8"}, r"cores='8' must be an integer"),
    ({"prologue": "module load cuda"}, r"prologue must be a list of strings"),
])
def test_a_bad_cluster_file_is_refused_naming_the_key(tmp_path, content, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        Executor.parse(f"slurm:{path}")


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_the_job_script_asks_for_the_cluster_files_resources(tmp_path, kind):
    pytest.importorskip("dask_jobqueue")
    path = tmp_path / "cluster.yaml"
    path.write_text("jobs: 4\ncores: 8\nmemory: 32GB\ngpus: 1\nwalltime: '06:00:00'\nqueue: gpu\naccount: proj\n"
                    "python: /opt/env/bin/python\nprologue: ['module load cuda']\n")
    script = job_script(f"{kind}:{path}")
    if kind == "slurm":
        for line in ("#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1", "#SBATCH -t 06:00:00", "#SBATCH -p gpu",
                     "#SBATCH -A proj"):
            assert line in script, script
    else:
        for line in ("#PBS -l select=1:ncpus=8:mem=32GB:ngpus=1", "#PBS -l walltime=06:00:00", "#PBS -q gpu",
                     "#PBS -A proj"):
            assert line in script, script
    assert "module load cuda" in script and "export OMP_NUM_THREADS=8" in script
    # one Dask thread: a worker trains one run at a time, on all of the job's cores
    assert "/opt/env/bin/python -m distributed.cli.dask_worker" in script and "--nthreads 1" in script


@pytest.mark.slow
def test_an_unreachable_scheduler_is_a_clear_error(fake_data_root, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"no Dask scheduler answered at tcp://127.0.0.1:{port}"):
        ensure_runs([config(epochs=1)], tmp_path, data_root=fake_data_root, executor=f"tcp://127.0.0.1:{port}",
                    progress=False)


@pytest.mark.slow
def test_two_worker_processes_give_the_sequential_results_at_the_same_thread_count(fake_data_root, tmp_path):
    executor = Executor.parse("processes:2")
    configs = [config(("fashion1", "fashion2"), epochs=2, seed=s) for s in range(2)] + [config(epochs=2)]
    paths = ensure_runs(configs, tmp_path / "cluster", data_root=fake_data_root, executor=executor, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(executor.torch_threads())
    try:
        local = ensure_runs(configs, tmp_path / "local", data_root=fake_data_root, progress=False)
    finally:
        torch.set_num_threads(threads)

    for remote, here in zip(paths, local):
        remote, here = load_run(remote), load_run(here)
        assert remote.attrs["torch_threads"] == here.attrs["torch_threads"] == executor.torch_threads()
        assert_identical(remote, here)

    assert all(p.exists() for p in paths)


def test_run_files_carry_units_directions_and_the_results_version(fake_data_root):
    from mtlcore.training import trainer

    ds = trainer.run(config(("fashion1", "fashion2"), epochs=1), data_root=fake_data_root, progress=False)
    assert ds.attrs["results_version"] == RESULTS_VERSION
    assert ds.attrs["torch_threads"] == torch.get_num_threads()
    for name in ("train_loss", "test_score", "sharpness", "fisher_trace", "conflict", "task_weight", "test_scores"):
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"], name
    accuracy = list(ds["score"].values).index("accuracy")
    assert ds["score_higher_is_better"].values[accuracy] == 1 and ds["score_percent"].values[accuracy] == 1


def test_a_lazy_combine_reads_nothing_until_computed_and_equals_the_eager_one(fake_data_root, tmp_path):
    configs = [config(epochs=1, seed=s) for s in range(2)] + [config(("fashion1", "fashion2"), epochs=2)]
    eager = load_runs(configs, tmp_path, data_root=fake_data_root, progress=False)
    lazy = load_runs(configs, tmp_path, data_root=fake_data_root, progress=False, lazy=True)
    assert lazy["test_score"].chunks is not None and eager["test_score"].chunks is None
    xr.testing.assert_identical(lazy.compute(), eager)


def test_cached_only_trains_nothing_and_names_what_is_missing(fake_data_root, tmp_path, monkeypatch):
    configs = [config(epochs=1, seed=s) for s in range(2)]
    ensure_runs(configs[:1], tmp_path, data_root=fake_data_root, progress=False)
    assert len(ensure_runs(configs[:1], tmp_path, data_root=fake_data_root, cached_only=True, progress=False)) == 1
    monkeypatch.setenv("MTLCORE_CACHED_ONLY", "1")
    with pytest.raises(RunsMissing, match=r"1 of 2 runs are not in .* e\.g\. stl fashion1 uniform seed 1"):
        ensure_runs(configs, tmp_path, data_root=fake_data_root, progress=False)
    assert len(list((tmp_path / "runs").glob("*.nc"))) == 1


def test_a_batch_larger_than_the_training_set_is_refused(fake_data_root):
    from mtlcore.training.trainer import BatchSampler

    with pytest.raises(ConfigError, match=r"batch_size=600 is larger than the training set \(500 examples"):
        RunConfig.from_dict({**config().to_dict(), "batch_size": 600,
                             "setting_options": {**SMALL, "train_size": 500}})
    with pytest.raises(ValueError, match=r"batch_size=64 is larger than the training set \(50 examples\)"):
        BatchSampler(50, 64, torch.Generator())


def test_a_sweep_summary_counts_cached_trained_and_diverged_runs(fake_data_root, tmp_path, capsys):
    ensure_runs([config(epochs=1)], tmp_path, data_root=fake_data_root, progress=False)
    diverging = config(epochs=1, lr=1e6, optimizer="sgd")
    ensure_runs([config(epochs=1), diverging], tmp_path, data_root=fake_data_root)
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary == "2 runs: 1 on disk, 1 trained, 1 diverged (kept, status 'diverged'), 0 failed", summary
    assert np.isnan(load_run(ensure_runs([diverging], tmp_path, progress=False)[0])["train_loss"].values[-1])


def test_a_run_records_its_data_files_and_retrains_when_one_changed(fake_data_root, tmp_path, caplog):
    import hashlib
    import shutil

    from conftest import write_fake_mnist_folder

    root = tmp_path / "data"
    shutil.copytree(fake_data_root, root)
    first, second = config(epochs=1), config(("fashion1", "notmnist"), epochs=1)
    paths = ensure_runs([first, second], tmp_path / "results", data_root=root, progress=False)
    for path in paths:  # the second load comes from the readers' cache, and still names its files
        recorded = json.loads(load_run(path).attrs["data_files"])
        fashion = sorted(n for n in recorded if n.startswith("fashion-mnist/"))
        assert len(fashion) == 4 and all(n.endswith(".gz") for n in fashion), recorded
        for name, digest in recorded.items():
            assert digest == hashlib.sha256((root / name).read_bytes()).hexdigest()[:16]
    assert any(n.startswith("notmnist/") for n in json.loads(load_run(paths[1]).attrs["data_files"]))
    before = load_run(paths[0])

    write_fake_mnist_folder(root / "fashion-mnist", 1200, 400, seed=7)  # the same files, other images
    caplog.set_level("WARNING")
    again = ensure_runs([first], tmp_path / "results", data_root=root, progress=False)
    assert "was trained on other data: fashion-mnist/" in caplog.text
    assert len(list((tmp_path / "results" / "runs").glob(f"{paths[0].name}.stale-*"))) == 1
    retrained = load_run(again[0])
    assert retrained.attrs["data_files"] != before.attrs["data_files"]
    assert not np.array_equal(retrained["train_loss"].values, before["train_loss"].values)
    caplog.clear()
    ensure_runs([first], tmp_path / "results", data_root=root, progress=False)  # unchanged since: reused
    assert "trained on other data" not in caplog.text


def test_reads_are_recorded_per_thread(tmp_path):
    import threading

    from mtlcore.settings.locate import recording_reads

    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    seen = {}

    def read(name):
        with recording_reads(tmp_path) as files:
            with recording_reads(tmp_path) as inner:  # nested, equal (empty) sets: each leaves its own entry
                pass
            for _ in range(200):
                (tmp_path / name).read_text()
            seen[name] = (set(files), set(inner))

    threads = [threading.Thread(target=read, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": ({"a"}, set()), "b": ({"b"}, set())}
