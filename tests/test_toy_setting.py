"""The README's "adding a setting" walk-through, run as written, and the protocol in both regimes: a toy
regression setting trains under the uniform update, a gradient-level and a loss-level method, with every factor
measured."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcore import settings, training
from mtlcore.settings import Examples, SettingData

README = Path(__file__).resolve().parents[1] / "README.md"
FACTORS = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 64,
           "coherence": {"large_batch": 64}, "conflict": {"num_batches": 4}, "sharpness": {"steps": 3}}


@pytest.fixture(scope="module")
def walkthrough():
    """The README's code block, executed as a reader would paste it; the setting it registers is removed after."""
    text = README.read_text()
    match = re.search(r"<!-- adding-a-setting.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its 'adding a setting' block"
    namespace: dict = {}
    exec(compile(match.group(1), str(README), "exec"), namespace)  # noqa: S102 (the project's own README)
    yield namespace
    settings.unregister("two_lines")


def test_the_readme_walkthrough_trains_and_measures_every_factor(walkthrough):
    ds = walkthrough["ds"]
    assert ds.attrs["status"] == "complete" and ds.attrs["regime"] == "single_input"
    loss = ds["train_loss"].values
    assert (loss[-1] < 0.5 * loss[0]).all()
    for variable in ("sharpness", "fisher_trace", "grad_cov_trace", "conflict", "multitask_grad_cov_trace"):
        assert np.isfinite(ds[variable].values).all(), variable
    # a lower-is-better primary score, recorded with its direction
    assert ds["primary_score"].values.tolist() == ["mse", "mse"] and ds["higher_is_better"].values.tolist() == [0, 0]
    np.testing.assert_array_equal(ds["test_score"].values, ds["test_scores"].sel(score="mse").values)


def multi_input(setting: settings.Setting) -> type[settings.Setting]:
    """The same tasks with separate examples per task (the second half of each split for `down`)."""

    class TwoLinesApart(type(setting)):
        name, regime = "two_lines_apart", "multi_input"

        def load(self, tasks, options, root=None, download=True):
            joint = super().load(self.tasks, options, root, download).joint
            half = {s: len(e) // 2 for s, e in joint.items()}
            parts = {"up": lambda s: slice(0, half[s]), "down": lambda s: slice(half[s], None)}
            examples = {s: {t: Examples(e.inputs[parts[t](s)], e.targets[t][parts[t](s)]) for t in tasks}
                        for s, e in joint.items()}
            return SettingData(list(tasks), examples, info={})

    return TwoLinesApart


@pytest.mark.parametrize("regime", ["single_input", "multi_input"])
@pytest.mark.parametrize("aggregator", ["uniform", "pcgrad", "uncertainty"])
def test_both_regimes_train_under_each_kind_of_update(walkthrough, regime, aggregator):
    name = "two_lines"
    if regime == "multi_input":
        settings.register(multi_input(settings.get("two_lines")))
        name = "two_lines_apart"
    try:
        base = {"setting": name, "tasks": ["up", "down"], "epochs": 4, "batch_size": 32, "lr": 0.05,
                "device": "cpu", "metrics": FACTORS, "aggregator": aggregator}
        ds = training.run(base, progress=False)
        assert ds.attrs["status"] == "complete", ds.attrs["message"]
        assert ds.attrs["regime"] == regime
        assert (ds["train_loss"].values[-1] < 0.5 * ds["train_loss"].values[0]).all()
        measured = ds.sel(epoch=[0, 4])
        for variable in ("sharpness", "fisher_trace", "grad_cov_trace", "conflict"):
            assert np.isfinite(measured[variable].values).all(), variable
        # an epoch is the setting's train_size whatever the regime: 256 / 32 steps
        assert ds["step"].values.tolist() == [0, 8, 16, 24, 32]
        again = training.run(base, progress=False)
        np.testing.assert_array_equal(ds["train_loss"].values, again["train_loss"].values)
    finally:
        settings.unregister("two_lines_apart")


def test_stl_and_mtl_take_the_same_steps_when_task_sizes_differ(walkthrough):
    """A setting whose tasks have different training sizes: an epoch is `train_size` examples in STL and MTL."""
    settings.register(multi_input(settings.get("two_lines")))
    try:
        base = {"setting": "two_lines_apart", "epochs": 1, "batch_size": 32, "device": "cpu"}
        stl = training.run({**base, "tasks": ["up"]}, progress=False)
        mtl = training.run({**base, "tasks": ["up", "down"]}, progress=False)
        assert stl["step"].values.tolist() == mtl["step"].values.tolist() == [0, 8]
    finally:
        settings.unregister("two_lines_apart")


def test_a_setting_must_declare_a_known_regime():
    with pytest.raises(TypeError, match="regime"):
        type("Bad", (settings.Setting,), {"regime": "both"})


def test_unknown_names_list_the_valid_ones(walkthrough):
    with pytest.raises(training.ConfigError, match=r"valid settings: \[.*'fashion_mtl'"):
        training.RunConfig.from_dict({"setting": "fashion", "tasks": ["up"]})
    with pytest.raises(training.ConfigError, match=r"valid models: \['mlp'\]"):
        training.RunConfig.from_dict({"setting": "two_lines", "tasks": ["up"], "model": "resnet"})
    with pytest.raises(training.ConfigError, match=r"unknown option\(s\) \['width'\].*hidden"):
        training.RunConfig.from_dict({"setting": "two_lines", "tasks": ["up"], "model_options": {"width": 3}})
    with pytest.raises(training.ConfigError, match=r"valid tasks: \['up', 'down'\]"):
        training.RunConfig.from_dict({"setting": "two_lines", "tasks": ["sideways"]})
    with pytest.raises(training.ConfigError, match="config needs `setting`"):
        training.RunConfig.from_dict({"tasks": ["up"]})
    torch.manual_seed(0)


def test_uniform_and_gradient_level_methods_train_the_same_batch_norm_model(walkthrough):
    """Every method puts the step's batches through the encoder in one forward: with BatchNorm in the encoder the
    one-backward uniform update and the same update through J (K backward passes) move every parameter and
    running statistic alike, in both regimes."""
    from torch import nn

    from mtlcore.settings import MultiTaskModel

    def bn_mlp(tasks, *, hidden=16):
        encoder = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Tanh())
        return MultiTaskModel(encoder, {t: nn.Linear(hidden, 1) for t in tasks})

    single = settings.get("two_lines")
    for cls in (type(single), multi_input(single)):
        with_bn = type(cls.__name__ + "BN", (cls,), {"name": cls.name + "_bn", "models": {"bn_mlp": bn_mlp},
                                                     "default_model": "bn_mlp"})
        settings.register(with_bn)
        try:
            base = {"setting": with_bn.name, "tasks": ["up", "down"], "epochs": 2, "batch_size": 32, "lr": 0.05,
                    "device": "cpu", "optimizer": "sgd"}
            fast = training.run(base, progress=False)
            through_j = training.run({**base, "aggregator_options": {"reduction": "sum"}}, progress=False)
            np.testing.assert_allclose(fast["train_loss"].values, through_j["train_loss"].values, rtol=1e-5)
            np.testing.assert_allclose(fast["test_loss"].values, through_j["test_loss"].values, rtol=1e-5)
        finally:
            settings.unregister(with_bn.name)
