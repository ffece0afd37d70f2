"""Runs stay safe in a shared results folder: checkpoints never execute code, concurrent sweeps train each run once,
a killed sweep resumes what is missing, a failing run does not stop the others, stale claims are taken over."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcore.training import claims, ensure_runs, load_run, load_runs, trainer as train
from mtlcore.training.runner import RunsFailed

from conftest import SMALL
from test_train import assert_identical, config, trainer_after_updates

REPO = Path(__file__).resolve().parents[1]


def checkpoint_of(cfg, results_dir) -> Path:
    return train.run_path(cfg, results_dir).with_suffix(".partial.pt")


class Planted:
    """A pickle that creates `marker` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_checkpoint_runs_nothing_and_the_run_completes(fake_data_root, tmp_path, caplog):
    cfg = config(epochs=2)
    marker = tmp_path / "pwned"
    # the plant is live: an unsafe load would create the marker
    probe = tmp_path / "probe.pt"
    torch.save({"epoch": 1, "model": Planted(marker)}, probe)
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()

    planted = checkpoint_of(cfg, tmp_path / "results")
    planted.parent.mkdir(parents=True)
    torch.save({"format": train.CHECKPOINT_FORMAT, "epoch": 1, "model": Planted(marker)}, planted)
    with caplog.at_level("WARNING", logger="mtlcore.training.trainer"):
        ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path / "results", progress=False)
    assert not marker.exists()
    assert planted.name in caplog.text and "restarts from scratch" in caplog.text
    assert not planted.exists() and len(list(planted.parent.glob(planted.name + ".rejected-*"))) == 1
    assert ds.attrs["status"] == "complete"
    assert_identical(train.run(cfg, data_root=fake_data_root, progress=False), ds)  # trained from scratch


@pytest.mark.parametrize("damage", ["garbage", "truncated", "older format"])
def test_a_corrupt_checkpoint_is_set_aside_and_the_run_restarts(fake_data_root, tmp_path, caplog, damage):
    cfg = config(("fashion1", "fashion2"), epochs=2, aggregator="pcgrad")
    checkpoint = checkpoint_of(cfg, tmp_path)
    checkpoint.parent.mkdir(parents=True)
    if damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        trainer = trainer_after_updates(cfg, fake_data_root)
        trainer.epoch = 1
        torch.save(trainer.state_dict(), checkpoint)
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    else:  # what earlier versions wrote: numpy arrays, which only an unsafe load reads
        torch.save({"epoch": 1, "trajectory": {"train_loss": np.zeros((3, 2))}}, checkpoint)
    with caplog.at_level("WARNING", logger="mtlcore.training.trainer"):
        ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    assert checkpoint.name in caplog.text
    assert len(list(checkpoint.parent.glob(checkpoint.name + ".rejected-*"))) == 1 and not checkpoint.exists()
    assert_identical(train.run(cfg, data_root=fake_data_root, progress=False), ds)


@pytest.mark.parametrize("aggregator", ["gradnorm", "famo", "dwa", "nashmtl", "dbmtl", "uncertainty", "rlw"])
def test_every_stateful_checkpoint_loads_without_code(fake_data_root, tmp_path, aggregator):
    """The aggregators' state (internal optimizers, generators, buffers) is plain tensors and values too."""
    trainer = trainer_after_updates(config(("fashion1", "fashion2"), aggregator=aggregator), fake_data_root, steps=2)
    trainer.update.end_epoch(torch.tensor([1.0, 2.0]))
    trainer.update.end_epoch(torch.tensor([0.9, 1.5]))
    torch.save(trainer.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = trainer_after_updates(config(("fashion1", "fashion2"), aggregator=aggregator), fake_data_root, steps=0)
    fresh.load_state_dict(loaded)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[name], value, rtol=0, atol=0)


# -- claims -----------------------------------------------------------------------------------------------------

def write_claim(path: Path, pid: int, heartbeat: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": heartbeat,
                                "heartbeat": heartbeat}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_stale_claim_of_a_dead_process_is_taken_over(fake_data_root, tmp_path, caplog):
    cfg = config(epochs=1)
    claim = train.claim_path(train.run_path(cfg, tmp_path))
    write_claim(claim, dead_pid(), time.time())  # a fresh heartbeat, but its process is gone
    with caplog.at_level("WARNING", logger="mtlcore.training.claims"):
        ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False, wait=False)
    assert ds.attrs["status"] == "complete" and "taking over the stale claim" in caplog.text
    assert not claim.exists() and train.run_path(cfg, tmp_path).exists()


def test_a_live_claim_is_respected_until_its_heartbeat_is_old(fake_data_root, tmp_path):
    cfg = config(epochs=1)
    claim = train.claim_path(train.run_path(cfg, tmp_path))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_claim(claim, sleeper.pid, time.time())
        with pytest.raises(claims.RunClaimed, match=f"pid {sleeper.pid}"):
            train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False, wait=False)
        write_claim(claim, sleeper.pid, time.time() - 120)  # alive, but silent for 2 minutes
        ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False, wait=False,
                       claim_timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ds.attrs["status"] == "complete" and not claim.exists()


def test_a_run_waits_for_a_claim_to_be_released(fake_data_root, tmp_path, caplog):
    cfg = config(epochs=1)
    held = claims.acquire(train.claim_path(train.run_path(cfg, tmp_path)))
    release = threading.Timer(0.5, held.release)
    started = time.monotonic()
    release.start()
    with caplog.at_level("WARNING", logger="mtlcore.training.trainer"):
        ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False, poll_seconds=0.05)
    release.join()
    assert time.monotonic() - started >= 0.5 and ds.attrs["status"] == "complete"
    assert f"pid {os.getpid()}" in caplog.text and "waiting for its run file" in caplog.text


def test_only_one_of_two_claims_wins_and_a_released_claim_is_free(tmp_path):
    path = tmp_path / "run.claim"
    first = claims.acquire(path)
    assert first is not None and claims.acquire(path) is None
    content = json.loads(path.read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
    first.release()
    assert not path.exists()
    second = claims.acquire(path, stale_after=0.5)
    try:
        beat = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.4)  # the heartbeat thread refreshes it every stale_after / 5
        assert json.loads(path.read_text())["heartbeat"] > beat
    finally:
        second.release()


# -- failures ---------------------------------------------------------------------------------------------------

def test_a_failing_run_is_recorded_and_the_others_complete(fake_data_root, tmp_path, monkeypatch, capsys):
    from mtlcore.cli import main

    configs = [config(epochs=1, seed=seed) for seed in (0, 1, 2)]
    bad = train.run_path(configs[1], tmp_path)
    original_record = train.Trainer._record

    def fails_for_seed_1(self):
        if self.config.seed == 1 and self.epoch == 1:
            raise RuntimeError("boom in epoch 1\nsecond line")
        original_record(self)

    monkeypatch.setattr(train.Trainer, "_record", fails_for_seed_1)
    with pytest.raises(RunsFailed, match=f"(?s)1 of 3 runs failed.*{bad.name}: RuntimeError: boom in epoch 1"):
        ensure_runs(configs, tmp_path, data_root=fake_data_root, progress=False)
    assert [train.run_path(c, tmp_path).exists() for c in configs] == [True, False, True]
    record = json.loads(train.failure_path(bad).read_text())
    assert record["type"] == "RuntimeError" and record["message"].startswith("boom")
    assert "fails_for_seed_1" in record["traceback"] and record["time"]
    assert list((tmp_path / "runs").glob("*.claim")) == []

    def refuse(*args, **kwargs):
        raise AssertionError("a failed run was trained again without retry_failed")

    monkeypatch.setattr(train, "Trainer", refuse)
    with pytest.raises(RunsFailed, match=bad.name):
        load_runs(configs, tmp_path, data_root=fake_data_root, progress=False)

    grid_file = tmp_path / "grid.yaml"
    base = {"setting": "fashion_mtl", "setting_options": SMALL, "tasks": ["fashion1"], "epochs": 1,
            "batch_size": 32, "lr": 0.05, "optimizer": "momentum", "device": "cpu"}
    grid_file.write_text(json.dumps({"base": base, "grid": {"seed": [0, 1, 2]}}))
    sweep = ["sweep", str(grid_file), "--results-dir", str(tmp_path), "--data-root", str(fake_data_root)]
    assert main(sweep) == 1 and bad.name in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*sweep, "--retry-failed"]) == 0
    assert not train.failure_path(bad).exists()
    assert_identical(train.run(configs[1], data_root=fake_data_root, progress=False), load_run(bad))


def test_a_results_dir_that_is_a_file_is_refused_before_training(fake_data_root, tmp_path, monkeypatch, capsys):
    from mtlcore.cli import main

    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("")
    monkeypatch.setattr(train, "Trainer", lambda *a, **k: pytest.fail("trained into a file"))
    for call in (lambda: ensure_runs([config(epochs=1)], not_a_folder, data_root=fake_data_root, progress=False),
                 lambda: train.run(config(epochs=1), data_root=fake_data_root, results_dir=not_a_folder)):
        with pytest.raises(ValueError, match=f"results_dir {not_a_folder}: .* is not a folder"):
            call()
    (tmp_path / "c.yaml").write_text("setting: fashion_mtl\ntasks: [fashion1]\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--results-dir", str(not_a_folder)]) == 2
    assert f"results_dir {not_a_folder}" in capsys.readouterr().err


# -- real processes ---------------------------------------------------------------------------------------------

def sweep_file(tmp_path: Path, epochs: int, seeds) -> Path:
    base = {"setting": "fashion_mtl", "setting_options": SMALL, "tasks": ["fashion1", "fashion2"], "epochs": epochs,
            "batch_size": 32, "lr": 0.05, "optimizer": "momentum", "device": "cpu", "aggregator": "pcgrad"}
    path = tmp_path / f"grid-{epochs}.yaml"
    path.write_text(json.dumps({"base": base, "grid": {"seed": list(seeds)}}))
    return path


def start_sweep(grid_file: Path, results_dir: Path, data_root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mtlcore.cli", "-v", "sweep", str(grid_file), "--results-dir",
                             str(results_dir), "--data-root", str(data_root)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return err


def trained(log: str) -> list[str]:
    """The run hashes a sweep's log says it trained (from scratch or resumed)."""
    return re.findall(r"training run (\w+) from epoch", log)


@pytest.mark.slow
def test_three_concurrent_sweeps_train_each_run_once(fake_data_root, tmp_path):
    grid_file = sweep_file(tmp_path, epochs=1, seeds=range(3))
    sweeps = [start_sweep(grid_file, tmp_path / "results", fake_data_root) for _ in range(3)]
    logs = [finish(process) for process in sweeps]
    runs = sorted((tmp_path / "results" / "runs").glob("*.nc"))
    counts = {}
    for log in logs:
        for run_hash in trained(log):
            counts[run_hash] = counts.get(run_hash, 0) + 1
    assert counts == {path.stem: 1 for path in runs} and len(runs) == 3, counts
    leftovers = [p.name for p in (tmp_path / "results" / "runs").iterdir() if p.suffix != ".nc"]
    assert leftovers == []


@pytest.mark.slow
def test_a_killed_sweep_trains_only_what_is_missing_and_resumes_bit_for_bit(fake_data_root, tmp_path):
    grid_file = sweep_file(tmp_path, epochs=3, seeds=range(2))
    reference = start_sweep(grid_file, tmp_path / "reference", fake_data_root)  # uninterrupted, meanwhile
    runs = tmp_path / "killed" / "runs"
    victim = start_sweep(grid_file, tmp_path / "killed", fake_data_root)
    deadline = time.monotonic() + 240
    while not (list(runs.glob("*.nc")) and list(runs.glob("*.partial.pt"))):
        assert victim.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.glob("*.nc")}
    partial = next(runs.glob("*.partial.pt")).name.split(".")[0]
    assert list(runs.glob("*.claim")), "the killed process left its claim"

    log = finish(start_sweep(grid_file, tmp_path / "killed", fake_data_root))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished} == finished  # untouched
    assert sorted(trained(log)) == sorted({p.stem for p in runs.glob("*.nc")} - {p.stem for p in finished})
    assert f"resuming run {partial} from epoch" in log
    finish(reference)
    for path in (tmp_path / "reference" / "runs").glob("*.nc"):
        assert_identical(load_run(path), load_run(runs / path.name))
    assert len(list(runs.glob("*.nc"))) == 2 and list(runs.glob("*.partial.pt")) == []
