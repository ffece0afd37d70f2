"""Run configs: validation names the bad key or value and the valid options; the hash is stable."""
import pytest

from mtlcore.training import ConfigError, RunConfig

BASE = {"setting": "fashion_mtl", "tasks": ["fashion1", "fashion2"]}


@pytest.mark.parametrize("change, pattern", [
    ({"optimiser": "adam"}, r"unknown config key\(s\) 'optimiser' \(did you mean 'optimizer'\?\); valid keys: \["),
    ({"setting": "fashion"}, r"unknown setting 'fashion'; valid settings: \[.*'fashion_mtl'.*\]"),
    ({"tasks": ["fashion1", "cifar"]}, r"unknown task\(s\) \['cifar'\].*valid tasks: \['fashion1'"),
    ({"optimizer": "rmsprop"}, r"optimizer='rmsprop' is not valid; choose one of \['sgd', 'momentum', 'adam'\]"),
    ({"lr": -0.1}, r"lr=-0.1 must be a positive finite number"),
    ({"lr": float("inf")}, r"lr=inf must be a positive finite number"),
    ({"lr": "1e-3"}, r"lr='1e-3' must be a positive finite number \(got the string '1e-3'"),
    ({"weight_decay": float("nan")}, r"weight_decay=nan must be a number in \[0, inf\)"),
    ({"momentum": "0.9"}, r"momentum='0.9' must be a number in \[0, 1\) \(got the string"),
    ({"seed": True}, r"seed=True must be a non-negative integer"),
    ({"setting_options": {"train_size": True}}, r"setting option train_size=True must be an integer >= 1"),
    ({"setting_options": {"data_seed": 0.5}}, r"setting option data_seed=0.5 must be an integer >= 0"),
    ({"setting_options": {"data_seed": -1}}, r"setting option data_seed=-1 must be an integer >= 0"),
    ({"setting_options": [1]}, r"setting_options=\[1\] must be a mapping"),
    ({"tasks": 5}, r"tasks=5 must be a task name or a list of task names"),
    ({"metrics": ["sharpness"]}, r"metrics=\['sharpness'\] must be a mapping"),
    ({"aggregator": "pcgrad", "aggregator_options": {"generator": 5}}, r"generator: the trainer seeds"),
    ({"aggregator": "fixed", "aggregator_options": {"weights": [1, 2, 3]}}, r"3 weights were given for 2 tasks"),
    ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ({"epochs": 2.5}, r"epochs=2.5 must be a positive integer"),
    ({"loss_scale": "max"}, r"loss_scale='max' is not valid"),
    ({"setting_options": {"train_sz": 5}}, r"unknown setting option\(s\) \['train_sz'\]"),
    ({"setting_options": {"train_size": 0}}, r"train_size=0 must be an integer >= 1"),
    ({"aggregator": "mgdaa"}, r"unknown aggregator 'mgdaa'; valid names: .*mgda"),
    ({"aggregator": "cagrad", "aggregator_options": {"alpha": 1}}, r"cagrad: unknown option\(s\) \['alpha'\]"),
    ({"dropout": 0.5}, r"unknown config key\(s\) 'dropout'"),
    ({"model_options": {"dropout": 1.0}}, r"model option dropout=1.0 must be a number in \[0, 1\)"),
    ({"model": "resnet18"}, r"unknown model 'resnet18' for setting 'fashion_mtl'; valid models: \['lenet', 'lenet_fused'\]"),
    ({"model_options": {"width": 2}}, r"model 'lenet': unknown option\(s\) \['width'\]; valid options \(defaults\): \{'dropout': 0.5\}"),
    ({"model_options": [0.5]}, r"model_options=\[0.5\] must be a mapping"),
    ({"device": "tpu"}, r"device='tpu'"),
    ({"device": "cudax"}, r"device='cudax'; use 'auto', 'cpu' or 'cuda\[:N\]'"),
    ({"metrics": {"every": True}}, r"metrics.every=True must be a positive integer"),
])
def test_bad_config_is_refused_with_the_fix(change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_dict({**BASE, **change})


def test_a_config_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="a run config is a mapping of keys to values"):
        RunConfig.from_dict(["tasks", "fashion1"])


def test_missing_tasks_and_setting():
    with pytest.raises(ConfigError, match="config needs `tasks`"):
        RunConfig.from_dict({"setting": "fashion_mtl", "lr": 0.1})
    with pytest.raises(ConfigError, match=r"config needs `setting`: one of \[.*'fashion_mtl'"):
        RunConfig.from_dict({"tasks": ["fashion1"]})


def test_hash_is_stable_and_covers_what_changes_results():
    a = RunConfig.from_dict({**BASE, "lr": 0.01, "seed": 1})
    b = RunConfig.from_dict({"seed": 1, "lr": 0.01, **BASE})
    assert a.content_hash() == b.content_hash() and len(a.content_hash()) == 16
    assert a.content_hash() != a.replace(lr=0.02).content_hash()
    assert a.content_hash() != a.replace(seed=2).content_hash()
    assert a.content_hash() == a.replace(device="cpu").content_hash()  # where it runs is not what it is
    # defaults spelled out give the same run as defaults left out
    assert a.content_hash() == a.replace(setting_options={"train_size": 25_000}).content_hash()
    cagrad = a.replace(aggregator="cagrad")
    assert cagrad.content_hash() == cagrad.replace(aggregator_options={"c": 0.5}).content_hash()
    assert cagrad.content_hash() != cagrad.replace(aggregator_options={"c": 0.4}).content_hash()
    assert a.content_hash() == a.replace(metrics={"every": 1}).content_hash()  # no factors: nothing is measured
    measured = a.replace(metrics={"factors": ["fisher_trace"]})
    assert measured.content_hash() == measured.replace(metrics={"factors": ["fisher_trace"], "examples": 2048}).content_hash()
    assert measured.content_hash() != measured.replace(metrics={"factors": ["fisher_trace"], "examples": 1024}).content_hash()
    # options of a factor that is not measured change nothing
    assert measured.content_hash() == measured.replace(metrics={"factors": ["fisher_trace"], "conflict": {"num_batches": 5}}).content_hash()
    # uniform with options goes through the aggregator, without them through the fast path: different runs
    assert a.content_hash() != a.replace(aggregator_options={"reduction": "sum"}).content_hash()
    # the default model spelled out is the same run; its fused variant rounds differently: another run
    assert a.content_hash() == a.replace(model="lenet", model_options={"dropout": 0.5}).content_hash()
    assert a.content_hash() != a.replace(model="lenet_fused").content_hash()
    assert a.content_hash() != a.replace(model_options={"dropout": 0.25}).content_hash()


def test_mode_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("setting: fashion_mtl\ntasks: fashion1\nlr: 0.05\n")
    config = RunConfig.from_yaml(path)
    assert config.tasks == ("fashion1",) and config.mode == "stl" and config.lr == 0.05
    assert RunConfig.from_dict(BASE).mode == "mtl"


def test_yaml_reads_exponent_floats_and_names_a_broken_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("setting: fashion_mtl\ntasks: [fashion1]\nlr: 1e-3\nweight_decay: 5E-4\nseed: 3\n")  # YAML 1.1 would give strings
    config = RunConfig.from_yaml(path)
    assert config.lr == 0.001 and config.weight_decay == 0.0005 and config.seed == 3
    path.write_text("tasks: [fashion1\n")
    with pytest.raises(ConfigError, match=f"{path} is not valid YAML"):
        RunConfig.from_yaml(path)


def test_the_package_has_no_import_cycle():
    """Every module imports on its own in a fresh interpreter, in any order (a cycle fails for one of them)."""
    import pkgutil
    import subprocess
    import sys

    import mtlcore

    names = [m.name for m in pkgutil.walk_packages(mtlcore.__path__, "mtlcore.")]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for order in (names, names[::-1]):
        done = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    for name in names:  # each alone first: a cycle shows when its module is the first one imported
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr[-2000:])
