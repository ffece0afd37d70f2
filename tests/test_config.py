"""Run configs: validation names the bad key or value and the valid options; the hash is stable."""
import pytest

from mtlcore.config import ConfigError, RunConfig

BASE = {"tasks": ["fashion1", "fashion2"]}


@pytest.mark.parametrize("change, pattern", [
    ({"optimiser": "adam"}, r"unknown config key\(s\) 'optimiser' \(did you mean 'optimizer'\?\); valid keys: \["),
    ({"setting": "fashion"}, r"unknown setting 'fashion'; valid settings: \['fashion_mtl'\]"),
    ({"tasks": ["fashion1", "cifar"]}, r"unknown task\(s\) \['cifar'\].*valid tasks: \['fashion1'"),
    ({"optimizer": "rmsprop"}, r"optimizer='rmsprop' is not valid; choose one of \['sgd', 'momentum', 'adam'\]"),
    ({"lr": -0.1}, r"lr=-0.1 must be a positive number"),
    ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ({"epochs": 2.5}, r"epochs=2.5 must be a positive integer"),
    ({"loss_scale": "max"}, r"loss_scale='max' is not valid"),
    ({"setting_options": {"train_sz": 5}}, r"unknown setting option\(s\) \['train_sz'\]"),
    ({"setting_options": {"train_size": 0}}, r"train_size=0 must be a positive integer"),
    ({"aggregator": "mgdaa"}, r"unknown aggregator 'mgdaa'; valid names: .*mgda"),
    ({"aggregator": "cagrad", "aggregator_options": {"alpha": 1}}, r"cagrad: unknown option\(s\) \['alpha'\]"),
    ({"dropout": 1.0}, r"dropout=1.0 must lie in \[0, 1\)"),
    ({"device": "tpu"}, r"device='tpu'"),
])
def test_bad_config_is_refused_with_the_fix(change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_dict({**BASE, **change})


def test_missing_tasks():
    with pytest.raises(ConfigError, match="config needs `tasks`"):
        RunConfig.from_dict({"lr": 0.1})


def test_hash_is_stable_and_covers_what_changes_results():
    a = RunConfig.from_dict({**BASE, "lr": 0.01, "seed": 1})
    b = RunConfig.from_dict({"seed": 1, "lr": 0.01, **BASE})
    assert a.content_hash() == b.content_hash() and len(a.content_hash()) == 16
    assert a.content_hash() != a.replace(lr=0.02).content_hash()
    assert a.content_hash() != a.replace(seed=2).content_hash()
    assert a.content_hash() == a.replace(device="cpu").content_hash()  # where it runs is not what it is
    # defaults spelled out give the same run as defaults left out
    assert a.content_hash() == a.replace(setting_options={"train_size": 25_000}).content_hash()


def test_mode_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tasks: fashion1\nlr: 0.05\n")
    config = RunConfig.from_yaml(path)
    assert config.tasks == ("fashion1",) and config.mode == "stl" and config.lr == 0.05
    assert RunConfig.from_dict(BASE).mode == "mtl"
