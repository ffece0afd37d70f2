"""The training loop: learns, counts steps alike for STL and MTL, reproduces bit for bit, resumes, and
records divergence; run files are written atomically and skipped when done."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import xarray as xr

from mtlcore import settings
from mtlcore.training import RunConfig, ensure_runs, trainer as train
from mtlcore.training.results import (SCORE_VARIABLES, VARIABLES, combine_runs, load_run, run_attrs, save_atomic,
                                      validate_run)
from mtlcore.training.updates import UniformUpdate

from conftest import SMALL

BASE = {"setting": "fashion_mtl", "setting_options": SMALL, "epochs": 3, "batch_size": 32, "lr": 0.05, "optimizer": "momentum", "device": "cpu"}


def config(tasks=("fashion1",), **changes) -> RunConfig:
    return RunConfig.from_dict({**BASE, "tasks": list(tasks), **changes})


def assert_identical(a: xr.Dataset, b: xr.Dataset) -> None:
    for name in (*VARIABLES, *SCORE_VARIABLES):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)  # NaN == NaN here
    np.testing.assert_array_equal(a["step"].values, b["step"].values)


def test_training_lowers_the_loss_and_learns(fake_data_root):
    ds = train.run(config(), data_root=fake_data_root, progress=False)
    loss = ds["train_loss"].sel(task="fashion1").values
    assert loss[-1] < 0.7 * loss[0]
    assert ds["test_score"].sel(task="fashion1").values[-1] > 0.3  # chance is 0.1
    assert ds.attrs["status"] == "complete"


def test_stl_and_mtl_take_the_same_steps(fake_data_root):
    stl = train.run(config(epochs=2), data_root=fake_data_root, progress=False)
    mtl = train.run(config(("fashion1", "noisy_fashion"), epochs=2), data_root=fake_data_root, progress=False)
    assert stl["step"].values.tolist() == mtl["step"].values.tolist() == [0, 7, 14]  # ceil(200/32) per epoch


def test_same_seed_same_dataset_other_seed_other(fake_data_root):
    a = train.run(config(("fashion1", "fashion2"), epochs=2), data_root=fake_data_root, progress=False)
    b = train.run(config(("fashion1", "fashion2"), epochs=2), data_root=fake_data_root, progress=False)
    c = train.run(config(("fashion1", "fashion2"), epochs=2, seed=1), data_root=fake_data_root, progress=False)
    assert_identical(a, b)
    assert not np.array_equal(a["train_loss"].values, c["train_loss"].values)


def test_stl_and_mtl_start_from_the_same_weights(fake_data_root):
    stl = train.run(config(epochs=1), data_root=fake_data_root, progress=False)
    mtl = train.run(config(("fashion1", "notmnist"), epochs=1), data_root=fake_data_root, progress=False)
    np.testing.assert_array_equal(stl["test_loss"].sel(task="fashion1", epoch=0), mtl["test_loss"].sel(task="fashion1", epoch=0))


def test_results_schema_round_trip(fake_data_root, tmp_path):
    cfg = config(("fashion1", "fashion2"), epochs=1)
    ds = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    path = train.run_path(cfg, tmp_path)
    assert path.name == f"{cfg.content_hash()}.nc"
    loaded = load_run(path)
    validate_run(loaded)
    assert_identical(ds, loaded)
    attrs = run_attrs(path)  # the attributes alone, read without the variables
    assert list(attrs) == list(loaded.attrs) and all(type(attrs[k]) is type(v) for k, v in loaded.attrs.items())
    assert attrs == loaded.attrs
    assert RunConfig.from_dict(__import__("json").loads(loaded.attrs["config"])).content_hash() == cfg.content_hash()
    assert loaded.attrs["tasks"] == '["fashion1", "fashion2"]' and loaded.attrs["mode"] == "mtl"
    # what the splits and numbers depend on besides the config: the data files and the libraries' versions
    data_info = __import__("json").loads(loaded.attrs["data_info"])
    assert len(data_info["files_md5"]) == 4 and loaded.attrs["numpy_version"] == np.__version__


def test_a_run_file_read_again_is_its_current_content_and_a_copy(fake_data_root, tmp_path):
    cfg = config(("fashion1",), epochs=1)
    train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    path = train.run_path(cfg, tmp_path)
    first = load_run(path)
    first["train_loss"][:] = -1.0  # a caller changing its copy
    first.attrs["status"] = "changed"
    again = load_run(path)
    with xr.open_dataset(path, engine="h5netcdf") as on_disk:
        assert_identical(again, on_disk.load())
    replaced = again.copy(deep=True)
    replaced.attrs["message"] = "replaced"
    save_atomic(replaced, path)  # a new file under the same name (a run trained again)
    assert load_run(path).attrs["message"] == "replaced"
    path.unlink()
    with pytest.raises(FileNotFoundError):
        load_run(path)


def test_finished_runs_are_skipped(fake_data_root, tmp_path, monkeypatch):
    cfg = config(epochs=1)
    first = train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "Trainer", refuse)
    assert_identical(first, train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False))


# uniform (the fast path) and every randomised method: their generator must continue where it stopped.
@pytest.mark.parametrize("aggregator", ["uniform", "rlw", "graddrop", "pcgrad", "gradvac"])
def test_a_killed_run_resumes_bit_for_bit(fake_data_root, tmp_path, monkeypatch, aggregator):
    cfg = config(("fashion1", "fashion2", "noisy_fashion"), epochs=3, aggregator=aggregator)
    reference = train.run(cfg, data_root=fake_data_root, progress=False)
    umask = os.umask(0o022)  # so that the usual mode (0644) differs from mkstemp's owner-only 0600
    try:
        resumed = _kill_and_resume(cfg, fake_data_root, tmp_path, monkeypatch)
    finally:
        os.umask(umask)
    assert_identical(reference, resumed)
    assert not train.run_path(cfg, tmp_path).with_suffix(".partial.pt").exists()
    assert train.run_path(cfg, tmp_path).stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_from_another_device_type_resumes(fake_data_root, tmp_path, monkeypatch, caplog):
    """A CUDA generator's state cannot be loaded into a CPU one: the draws restart from the seed, with a warning."""
    cfg = config(("fashion1", "fashion2", "noisy_fashion"), epochs=3, aggregator="pcgrad")

    def as_if_from_cuda(state):
        state["update"]["generator"] = {"device": "cuda", "state": torch.zeros(16, dtype=torch.uint8)}
        return state

    resumed = _kill_and_resume(cfg, fake_data_root, tmp_path, monkeypatch, edit_checkpoint=as_if_from_cuda)
    assert resumed.attrs["status"] == "complete" and "draws restart from the seed" in caplog.text


def _kill_and_resume(cfg, fake_data_root, tmp_path, monkeypatch, edit_checkpoint=None):
    original_record = train.Trainer._record

    def killed_in_epoch_2(self):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint
        original_record(self)

    monkeypatch.setattr(train.Trainer, "_record", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    assert not train.run_path(cfg, tmp_path).exists()  # nothing that reads as complete
    assert train.run_path(cfg, tmp_path).with_suffix(".partial.pt").exists()
    monkeypatch.setattr(train.Trainer, "_record", original_record)
    if edit_checkpoint is not None:
        checkpoint = train.run_path(cfg, tmp_path).with_suffix(".partial.pt")
        torch.save(edit_checkpoint(torch.load(checkpoint, weights_only=False)), checkpoint)
    return train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)


def test_a_killed_write_leaves_no_file(fake_data_root, tmp_path, monkeypatch):
    cfg = config(epochs=1)

    def crash(self, path, *args, **kwargs):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    assert list((tmp_path / "runs").glob("*.nc")) == [] and list((tmp_path / "runs").glob("*.tmp")) == []


def test_divergence_is_recorded_and_the_batch_goes_on(fake_data_root, tmp_path):
    bad, good = config(lr=1e6, epochs=3), config(epochs=1)
    paths = ensure_runs([bad, good], tmp_path, data_root=fake_data_root, progress=False)
    diverged, fine = load_run(paths[0]), load_run(paths[1])
    assert diverged.attrs["status"] == "diverged" and "non-finite" in diverged.attrs["message"]
    assert np.isfinite(diverged["train_loss"].values[0]).all()  # the trajectory so far is kept
    assert np.isnan(diverged["train_loss"].values[-1]).all()
    assert fine.attrs["status"] == "complete"
    combined = combine_runs(paths)
    assert combined.sizes["run"] == 2 and list(combined["status"].values) == ["diverged", "complete"]


def test_combine_outer_joins_tasks(fake_data_root):
    stl = train.run(config(epochs=1), data_root=fake_data_root, progress=False)
    mtl = train.run(config(("fashion1", "notmnist"), epochs=1), data_root=fake_data_root, progress=False)
    combined = combine_runs([stl, mtl])
    assert combined.sizes == {"run": 2, "epoch": 2, "task": 2, "score": 1}
    assert np.isnan(combined["train_loss"].sel(task="notmnist").values[0]).all()
    assert list(combined["mode"].values) == ["stl", "mtl"]
    # every run attribute is a coordinate along run: runs of a sweep can be told apart by their config
    assert [json.loads(c)["tasks"] for c in combined["config"].values] == [["fashion1"], ["fashion1", "notmnist"]]
    assert set(stl.attrs) <= set(combined.coords)


def test_a_repeated_config_is_trained_and_counted_once(fake_data_root, tmp_path, caplog):
    configs = [config(epochs=1), config(epochs=1), config(epochs=1, seed=1), config(epochs=1, lr=5.0e-2)]
    assert configs[3].lr == configs[0].lr  # BASE's lr 0.05 written another way: the same run
    with caplog.at_level("WARNING", logger="mtlcore.training.runner"):
        paths = ensure_runs(configs, tmp_path, data_root=fake_data_root, progress=False)
    assert len(paths) == 2 == len(set(paths)) and "2 of the 4 configs repeat" in caplog.text
    assert [ds.attrs["seed"] for ds in map(load_run, paths)] == [0, 1]


@pytest.mark.parametrize("name, options", [("mgda", {}), ("pcgrad", {}), ("gradnorm", {}), ("famo", {}),
                                           ("dwa", {}), ("mgda_ub", {}), ("uncertainty", {})])
def test_aggregators_train_and_record_weights(fake_data_root, name, options):
    ds = train.run(config(("fashion1", "fashion2"), epochs=2, aggregator=name, aggregator_options=options),
                   data_root=fake_data_root, progress=False)
    assert ds.attrs["status"] == "complete" and ds.attrs["aggregator"] == name
    weights = ds["task_weight"].values[1:]
    assert np.isfinite(weights).all() and (weights > 0).all()
    loss = ds["train_loss"].sel(task="fashion1").values
    assert loss[-1] < loss[0]


def test_uniform_weights_follow_the_loss_scale(fake_data_root):
    ds = train.run(config(("fashion1", "fashion2"), epochs=1, loss_scale="mean"), data_root=fake_data_root, progress=False)
    np.testing.assert_allclose(ds["task_weight"].values[1], [0.5, 0.5])


def test_dask_executor_trains_the_missing_runs(fake_data_root, tmp_path):
    from distributed import Client

    configs = [config(epochs=1), config(epochs=1, seed=1)]
    ensure_runs(configs[:1], tmp_path, data_root=fake_data_root, progress=False)  # one already on disk
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        paths = ensure_runs(configs, tmp_path, data_root=fake_data_root, executor="dask", dask_client=client, progress=False)
    assert all(p.exists() for p in paths)
    local = train.run(configs[1], data_root=fake_data_root, progress=False)
    assert_identical(local, load_run(paths[1]))  # same numbers wherever it ran


def trainer_after_updates(cfg: RunConfig, data_root, steps: int = 1) -> train.Trainer:
    """A Trainer for `cfg` after `steps` optimisation steps (the inner loop of Trainer._train_epoch)."""
    setting = settings.get(cfg.setting)
    data = setting.load(cfg.tasks, cfg.setting_options, root=data_root)
    trainer = train.Trainer(cfg, setting, data, train.resolve_device(cfg.device))
    for _ in range(steps):
        trainer.train_step()
    return trainer


def assert_grads_in_parameter_layout(trainer: train.Trainer) -> None:
    trainer.update.apply(trainer._losses(trainer._batch()))
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride(), name


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_the_jacobian_path_applies_the_same_update_as_the_fast_path(fake_data_root, optimizer):
    """Uniform weights through J (K backward passes, d = Jᵀw written into .grad) and the fast path (one backward
    of Σ L_k) must move every parameter alike: a gradient written in another memory layout than its
    (channels-last) parameter once made the fused optimizers apply it to the wrong entries."""
    moved = {}
    for label, options in (("fast", {}), ("jacobian", {"reduction": "sum"})):
        cfg = config(("fashion1", "fashion2"), optimizer=optimizer, model_options={"dropout": 0.0},
                     aggregator_options=options)
        trainer = trainer_after_updates(cfg, fake_data_root, steps=3)
        assert isinstance(trainer.update, UniformUpdate) == (label == "fast")
        moved[label] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for name, value in moved["fast"].items():
        np.testing.assert_allclose(moved["jacobian"][name].numpy(), value.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("aggregator", ["mgda", "mgda_ub", "pcgrad", "gradnorm", "famo"])
def test_every_gradient_has_its_parameters_memory_layout(fake_data_root, aggregator):
    assert_grads_in_parameter_layout(trainer_after_updates(config(("fashion1", "fashion2"), aggregator=aggregator),
                                                           fake_data_root, steps=0))


@pytest.mark.parametrize("aggregator, head_update", [("mgda", "own"), ("mgda", "weighted"), ("pcgrad", "weighted"),
                                                     ("graddrop", "weighted"), ("dbmtl", "weighted"), ("dbmtl", "own")])
def test_heads_get_their_own_task_gradient_weighted_as_documented(fake_data_root, aggregator, head_update):
    """Each head's gradient is c_k ∇L_k (its own task's loss only): c_k = 1 under "own"; under "weighted" the
    step's weight w_k, 1 for GradDrop (no weights), and 1/(L_k + ε) for DB-MTL (∇log(L_k + ε), as the authors)."""
    cfg = config(("fashion1", "fashion2"), aggregator=aggregator, head_update=head_update,
                 model_options={"dropout": 0.0})
    trainer = trainer_after_updates(cfg, fake_data_root, steps=0)
    step = trainer._losses(trainer._batch())
    plain = [torch.autograd.grad(step.losses[k], trainer.model.task_parameters(task), retain_graph=True)
             for k, task in enumerate(trainer.tasks)]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.update.apply(step)
    losses, weights = step.losses.detach(), trainer.update.aggregator.weights
    for k, task in enumerate(trainer.tasks):
        head = trainer.model.task_parameters(task)
        if head_update == "own" or aggregator == "graddrop":
            c = 1.0
        elif aggregator == "dbmtl":
            c = 1.0 / (float(losses[k]) + 1e-8)
        else:
            c = float(weights[k])
        for p, g in zip(head, plain[k]):
            torch.testing.assert_close(p.grad, c * g, rtol=1e-5, atol=1e-7)


def test_methods_that_use_their_draws_on_the_host_get_a_cpu_generator_in_a_gpu_run():
    """PCGrad's and GradVac's task orders and RLW's weights are used on the host, where a generator on the GPU would
    cost a round trip per draw; GradDrop masks J on the device. Checked without a GPU: the trainer only names the
    device when it builds the aggregator."""
    from mtlcore import aggregators
    from mtlcore._seeding import torch_generator
    from mtlcore.training.updates import make_update

    built = {name: aggregators.get(name, **({"weights": [1.0]} if name == "fixed" else {}))
             for name in aggregators.available()}
    randomised = {name for name, agg in built.items() if agg.randomised}
    on_host = {name for name in randomised if built[name].generator_device("cuda").type == "cpu"}
    assert on_host == {"pcgrad", "gradvac", "rlw"} and randomised - on_host == {"graddrop"}
    for name in sorted(on_host):
        model = settings.get("fashion_mtl").build_model("lenet", ["fashion1", "fashion2"])
        generator = make_update(name, {}, model, ["fashion1", "fashion2"], loss_scale="sum", head_update="own", seed=3,
                                device=torch.device("cuda")).aggregator.generator
        assert generator.device.type == "cpu"
        # the seed a CPU run of the method has always had
        assert torch.equal(generator.get_state(), torch_generator(3, "aggregator").get_state())


@pytest.mark.parametrize("aggregator, options, separate", [("pcgrad", {}, True), ("uniform", {"reduction": "sum"}, True),
                                                           ("uniform", {}, False), ("mgda_ub", {}, False),
                                                           ("gradnorm", {}, False)])
def test_only_methods_that_differentiate_each_task_get_a_graph_per_task(fake_data_root, aggregator, options, separate):
    """LeNet has no batch statistics, so one forward per task's batch is the same function as the joint forward;
    the trainer builds those graphs for the rows of J only (MGDA-UB differentiates the joint features). A BatchNorm
    encoder always gets the joint forward (tests/test_toy_setting.py)."""
    trainer = trainer_after_updates(config(("fashion1", "fashion2"), aggregator=aggregator, aggregator_options=options),
                                    fake_data_root, steps=0)
    assert not trainer.model.couples_examples
    assert (trainer._losses(trainer._batch()).features is None) == separate
