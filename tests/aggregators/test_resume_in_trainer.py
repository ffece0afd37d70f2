"""The methods with state that must survive a kill (tracked gradients, running sums, epoch counts, EMAs, a base's
generator) resume bit for bit in a real run of the trainer, and every added method trains through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL

from mtlcore.training import RunConfig, trainer as train
from mtlcore.training.results import SCORE_VARIABLES, VARIABLES
from mtlcore.training.updates import Step, make_update

BASE = {"setting": "fashion_mtl", "setting_options": SMALL, "epochs": 3, "batch_size": 32, "lr": 0.05,
        "optimizer": "momentum", "device": "cpu", "tasks": ["fashion1", "fashion2", "noisy_fashion"]}


def config(aggregator: str, options: dict) -> RunConfig:
    return RunConfig.from_dict({**BASE, "aggregator": aggregator, "aggregator_options": options})


def assert_identical(a, b) -> None:
    for name in (*VARIABLES, *SCORE_VARIABLES):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.parametrize("aggregator, options", [
    ("stch", {"warmup_epochs": 1}), ("excess_mtl", {}), ("moco", {}), ("cr_mogm", {"base": "pcgrad"}),
    ("modo", {"gamma": 0.1}), ("sdmgrad", {}),  # their extra batches come from the checkpointed samplers
])
def test_a_killed_run_resumes_bit_for_bit(fake_data_root, tmp_path, monkeypatch, aggregator, options):
    cfg = config(aggregator, options)
    reference = train.run(cfg, data_root=fake_data_root, progress=False)
    assert reference.attrs["status"] == "complete"
    original_record = train.Trainer._record

    def killed_in_epoch_2(self):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint
        original_record(self)

    monkeypatch.setattr(train.Trainer, "_record", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False)
    assert train.run_path(cfg, tmp_path).with_suffix(".partial.pt").exists()
    monkeypatch.setattr(train.Trainer, "_record", original_record)
    assert_identical(reference, train.run(cfg, data_root=fake_data_root, results_dir=tmp_path, progress=False))


# pbi is not among them: with equal preferences it holds the losses on the ray L₁ = L₂ = L₃, and noisy_fashion's
# loss cannot fall, so neither may fashion1's (the method working as meant); test_with_model trains it.
@pytest.mark.parametrize("aggregator", ["gls", "krum", "trimmed_mean", "config", "fairgrad"])
def test_trains_and_learns(fake_data_root, aggregator):
    ds = train.run(RunConfig.from_dict({**BASE, "epochs": 2, "aggregator": aggregator}), data_root=fake_data_root,
                   progress=False)
    assert ds.attrs["status"] == "complete"
    loss = ds["train_loss"].sel(task="fashion1").values  # noisy_fashion's labels are noise: it need not learn
    assert np.isfinite(ds["train_loss"].values).all() and loss[-1] < 0.8 * loss[0]


def test_a_multi_batch_method_draws_its_extra_batches_from_the_run(fake_data_root):
    """modo takes the step's batch and two more from the run's samplers each step: after one step the samplers
    stand where three steps of another method leave them."""
    cfg = RunConfig.from_dict({**BASE, "aggregator": "modo"})
    setting = train.settings.get("fashion_mtl")
    data = setting.load(cfg.tasks, cfg.setting_options, root=fake_data_root)
    modo, uniform = (train.Trainer(c, setting, data, torch.device("cpu"))
                     for c in (cfg, RunConfig.from_dict({**BASE, "aggregator": "uniform"})))
    modo.train_step()
    for _ in range(3):
        uniform._batch()
    for key in modo.samplers:
        assert modo.samplers[key].position == uniform.samplers[key].position
        assert torch.equal(modo.samplers[key].order, uniform.samplers[key].order)


def test_without_a_batch_source_a_multi_batch_method_is_refused():
    tasks = ["fashion1", "fashion2"]
    model = train.settings.get("fashion_mtl").build_model("lenet", tasks)
    update = make_update("sdmgrad", {}, model, tasks, loss_scale="sum", head_update="own", seed=0,
                         device=torch.device("cpu"))
    loss = train.settings.get("fashion_mtl").task("fashion1").loss
    features = model.encoder(torch.randn(4, 1, 28, 28))
    parts = [loss.mean(model.heads[t](features), torch.randint(0, 10, (4,))) for t in tasks]
    with pytest.raises(ValueError, match="sdmgrad needs 3 batches per step: give the update rule a batch source"):
        update.apply(Step(torch.stack(parts), parts, features))
