"""The CIFAR-100 setting on small files written in exactly the release's python format."""
from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtlcore import settings, training
from mtlcore.settings.cifar100 import CIFAR100, CrossEntropy, data
from mtlcore.settings.cifar100 import fixture as fixture_files
from mtlcore.settings.cifar100.model import resnet18
from mtlcore.settings.locate import DataNotFoundError

A, B = "aquatic_mammals", "large_man-made_outdoor_things"
SMALL = {"train_size": 40, "val_size": 10, "test_size": 12, "data_seed": 0}
TEST_ID_OFFSET = fixture_files.TEST_ID_OFFSET
write_cifar100 = fixture_files.write  # 12 training and 4 test images per fine class: 60 and 20 per task


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100(root)


@pytest.fixture(scope="module")
def registered():
    """The registry's CIFAR-100 is this folder's class."""
    assert type(settings.get("cifar100")) is CIFAR100


def raw_images(x: torch.Tensor, normalization: dict) -> np.ndarray:
    """The uint8 images that standardised to `x`."""
    mean, std = (torch.tensor(normalization[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return torch.round((x * std + mean) * 255).to(torch.uint8).numpy()


def image_ids(x: torch.Tensor, normalization: dict) -> np.ndarray:
    raw = raw_images(x, normalization).astype(np.int64)
    return raw[:, 0, 0, 0] + 256 * raw[:, 0, 0, 1]


# -- tasks and labels ------------------------------------------------------------------------------------
def test_tasks_are_the_release_superclasses_with_display_names():
    setting = CIFAR100()
    assert setting.name == "cifar100" and setting.display_name == "CIFAR-100" and setting.regime == "multi_input"
    assert len(setting.tasks) == 20 and setting.tasks[0] == A and setting.tasks[-1] == "vehicles_2"
    assert setting.display_names[A] == "Aquatic mammals"
    assert setting.display_names[B] == "Large man-made outdoor things"
    assert setting.train_size(setting.resolve_options({})) == 2_000
    with pytest.raises(ValueError, match="unknown task.*'dolphins'"):
        setting.load(["dolphins"], {})


def test_labels_are_five_way_in_fine_id_order(fixture):
    root, written = fixture
    loaded = CIFAR100().load([A, B], SMALL, root=root, download=False)
    for task in (A, B):
        fine_ids = sorted(np.flatnonzero(written["coarse_of_fine"] == data.TASKS.index(task)).tolist())
        assert loaded.info["classes"][task] == [f"fine{i}" for i in fine_ids]
        norm = loaded.info["normalization"][task]
        for split, (source, offset) in {"train": ("train", 0), "val": ("train", 0),
                                        "test": ("test", TEST_ID_OFFSET)}.items():
            examples = loaded.examples[split][task]
            assert examples.inputs.dtype == torch.float32 and examples.inputs.shape[1:] == (3, 32, 32)
            assert examples.targets.dtype == torch.int64
            ids = image_ids(examples.inputs, norm) - offset
            images, fine = written[source]
            np.testing.assert_array_equal(raw_images(examples.inputs, norm), images[ids])  # the very images
            expected = [fine_ids.index(int(f)) for f in fine[ids]]
            assert examples.targets.tolist() == expected
        assert set(loaded.examples["train"][task].targets.tolist()) == set(range(5))


# -- splits ----------------------------------------------------------------------------------------------
def _ids(loaded, task):
    norm = loaded.info["normalization"][task]
    return {s: image_ids(loaded.examples[s][task].inputs, norm).tolist() for s in ("train", "val", "test")}


def test_splits_are_disjoint_sized_and_a_pure_function_of_the_seed(fixture):
    root, written = fixture
    setting = CIFAR100()
    both = setting.load([A, B], SMALL, root=root, download=False)
    ids = _ids(both, B)
    assert [len(ids[s]) for s in ("train", "val", "test")] == [40, 10, 12]
    assert not set(ids["train"]) & set(ids["val"])
    assert len(set(ids["train"])) == 40 and len(set(ids["test"])) == 12
    assert set(ids["test"]) <= set(range(TEST_ID_OFFSET, TEST_ID_OFFSET + 2000))
    pool = np.flatnonzero(written["coarse_of_fine"][written["train"][1]] == data.TASKS.index(B))
    assert set(ids["train"]) | set(ids["val"]) <= set(pool.tolist())
    assert _ids(setting.load([B], SMALL, root=root, download=False), B) == ids  # other tasks change nothing
    assert _ids(setting.load([B, A], SMALL, root=root, download=False), B) == ids
    other_seed = _ids(setting.load([B], {**SMALL, "data_seed": 1}, root=root, download=False), B)
    assert other_seed["val"] != ids["val"] and other_seed["test"] != ids["test"]
    fewer = _ids(setting.load([B], {**SMALL, "train_size": 20}, root=root, download=False), B)
    assert fewer["val"] == ids["val"] and set(fewer["train"]) < set(ids["train"])  # val does not move with train_size
    every = _ids(setting.load([B], {**SMALL, "test_size": 20}, root=root, download=False), B)
    assert len(every["test"]) == 20 and set(ids["test"]) < set(every["test"])


def test_sizes_beyond_the_files_or_the_release_are_refused(fixture):
    root, _ = fixture
    setting = CIFAR100()
    with pytest.raises(ValueError, match=r"train_size \+ val_size = 55 \+ 10 = 65 but only 60 training images"):
        setting.load([A], {**SMALL, "train_size": 55}, root=root, download=False)
    with pytest.raises(ValueError, match="test_size = 21 but only 20 test images"):
        setting.load([A], {**SMALL, "test_size": 21}, root=root, download=False)
    with pytest.raises(ValueError, match=r"2000 \+ 501 = 2501 exceed the 2500 training images"):
        setting.resolve_options({"val_size": 501})
    with pytest.raises(ValueError, match="test_size=501 exceeds the 500"):
        setting.resolve_options({"test_size": 501})


def test_inputs_are_standardised_by_the_training_images_per_channel(fixture):
    root, written = fixture
    loaded = CIFAR100().load([A], SMALL, root=root, download=False)
    norm = loaded.info["normalization"][A]
    train = loaded.examples["train"][A].inputs
    raw = written["train"][0][image_ids(train, norm)]
    scaled = (raw.astype(np.float32) / np.float32(255.0)).astype(np.float64)  # the float32 inputs' pixel values
    np.testing.assert_allclose(norm["mean"], scaled.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], scaled.std(axis=(0, 2, 3)), rtol=1e-6)  # population std
    mean64, std64 = data.channel_statistics(raw)
    np.testing.assert_allclose(mean64, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std64, scaled.std(axis=(0, 2, 3)), rtol=1e-10)
    expected = (torch.from_numpy(raw).float() / 255.0 - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    assert torch.equal(train, expected)
    val = loaded.examples["val"][A].inputs  # by the training images' statistics, not its own
    raw_val = written["train"][0][image_ids(val, norm)]
    assert torch.equal(val, (torch.from_numpy(raw_val).float() / 255.0 - torch.tensor(norm["mean"]).view(1, 3, 1, 1))
                       / torch.tensor(norm["std"]).view(1, 3, 1, 1))
    info = loaded.info
    assert {k: info[k] for k in SMALL} == SMALL and info["data_root"] == str(root.resolve())


# -- files -----------------------------------------------------------------------------------------------
def test_missing_files_name_the_files_folders_and_how_to_get_them(tmp_path, monkeypatch, caplog):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    for download in (False, True):
        with caplog.at_level(logging.WARNING), pytest.raises(DataNotFoundError) as error:
            CIFAR100().load([A], SMALL, root=tmp_path, download=download)
        message = str(error.value)
        for needed in ("train", "test", "meta", str(tmp_path / "cifar-100-python"), "CIFAR100(",
                       "download=True", data.ARCHIVE_URL):
            assert needed in message
    assert "CIFAR-100 download failed: no internet" in caplog.text  # tried, logged, then the clear error
    write_cifar100(tmp_path)
    (tmp_path / data.LAYOUT / "test").unlink()
    with pytest.raises(DataNotFoundError, match=r"Missing: \['test'\]"):
        CIFAR100().load([A], SMALL, root=tmp_path, download=False)


def test_a_truncated_or_foreign_file_is_named(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / data.LAYOUT / "train"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    with pytest.raises(DataNotFoundError, match=r"(?s)cifar-100-python/train could not be loaded.*download it again"):
        CIFAR100().load([A], SMALL, root=tmp_path, download=False)
    content = {b"data": np.zeros((4, 1024), np.uint8), b"fine_labels": [0] * 4, b"coarse_labels": [0] * 4}
    train.write_bytes(pickle.dumps(content, protocol=2))  # CIFAR-10-sized images under CIFAR-100's name
    with pytest.raises(DataNotFoundError, match=r"train: data uint8 \(4, 1024\).*N×3072"):
        CIFAR100().load([A], SMALL, root=tmp_path, download=False)
    write_cifar100(tmp_path, coarse_names=[*data.TASKS[1:], data.TASKS[0]])
    with pytest.raises(ValueError, match=r"meta: its coarse_label_names \['fish', .*are not CIFAR-100's"):
        CIFAR100().load([A], SMALL, root=tmp_path, download=False)


def test_files_other_than_the_release_load_with_one_warning_each(tmp_path, caplog):
    write_cifar100(tmp_path, seed=3)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        loaded = CIFAR100().load([A], SMALL, root=tmp_path, download=False)
        CIFAR100().load([B], SMALL, root=tmp_path, download=False)
    warnings = [r.getMessage() for r in caplog.records if "is not the CIFAR-100 release" in r.getMessage()]
    assert len(warnings) == 3
    for name, release in data.RELEASE_MD5.items():
        found = hashlib.md5((tmp_path / data.LAYOUT / name).read_bytes()).hexdigest()
        assert loaded.info["files_md5"][f"cifar-100-python/{name}"] == found
        assert sum(f"/{name} is not" in w and found in w and release in w for w in warnings) == 1


# -- augmentation ----------------------------------------------------------------------------------------
def test_augment_only_moves_pixels_and_is_seeded():
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = data.augment(images, torch.Generator().manual_seed(5), padding=2, fill=fill)
    again = data.augment(images, torch.Generator().manual_seed(5), padding=2, fill=fill)
    other = data.augment(images, torch.Generator().manual_seed(6), padding=2, fill=fill)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out, again) and not torch.equal(out, other)
    padded = fill.view(1, 3, 1, 1).expand(16, 3, 12, 12).clone()
    padded[:, :, 2:10, 2:10] = images
    flipped, shifted = 0, 0
    for n in range(16):
        views = {(dy, dx, flip): padded[n, :, dy : dy + 8, dx : dx + 8].flip(-1) if flip
                 else padded[n, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5) for flip in (0, 1)}
        matches = [key for key, view in views.items() if torch.equal(view, out[n])]
        assert matches, f"image {n} is not a crop of its padded image"
        flipped += matches[0][2]
        shifted += matches[0][:2] != (2, 2)
    assert 0 < flipped < 16 and shifted > 0
    defaults = data.augment(torch.randn(4, 3, 32, 32), torch.Generator().manual_seed(0))  # padding 4, fill 0
    assert defaults.shape == (4, 3, 32, 32)


# -- model -----------------------------------------------------------------------------------------------
def test_resnet18_gives_penultimate_features_and_five_way_heads():
    model = resnet18([A, B])
    assert model.encoder.out_features == 512 and model.tasks == [A, B]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        features = model.encoder(x)
        assert features.shape == (2, 512) and model(x, B).shape == (2, 5)
    assert model.couples_examples  # BatchNorm: the trainer always does one joint forward
    assert isinstance(model.encoder.maxpool, nn.Identity) and isinstance(model.encoder.fc, nn.Identity)
    conv1 = model.encoder.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1) and conv1.bias is None
    # At width 64 it is torchvision's resnet18 with the stem and the last layer replaced.
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    reference.conv1, reference.maxpool, reference.fc = model.encoder.conv1, nn.Identity(), nn.Identity()
    ours = model.encoder.state_dict()
    assert {k: v.shape for k, v in reference.state_dict().items()} == {k: v.shape for k, v in ours.items()}
    reference.load_state_dict(ours)
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(reference(x), features, atol=1e-6)
    narrow = resnet18([A], width=4)
    assert narrow.encoder.out_features == 32 and narrow.encoder(torch.randn(3, 3, 32, 32)).shape == (3, 32)
    with pytest.raises(ValueError, match="width=0 must be an integer >= 1"):
        CIFAR100().resolve_model(None, {"width": 0})


def test_the_seeded_reset_keeps_resnet_initialisation():
    from mtlcore.training.trainer import seeded_reset

    model = resnet18([A], width=8)
    encoder = model.encoder
    seeded_reset(model, encoder, 3)
    weight = encoder.layer4[0].conv1.weight.detach()  # 64 × 32 × 3 × 3: fan_out 576
    assert abs(float(weight.std()) - (2 / 576) ** 0.5) < 0.1 * (2 / 576) ** 0.5
    first = encoder.layer1[0].conv2.weight.clone()
    seeded_reset(model, encoder, 3)
    assert torch.equal(encoder.layer1[0].conv2.weight, first)


def test_cross_entropy_samples_from_the_softmax():
    loss = CrossEntropy()
    outputs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 20.0], [20.0, 0.0, 0.0, 0.0, 0.0]])
    assert loss(outputs, torch.tensor([4, 0])).shape == (2,)
    assert loss.sample(outputs, torch.Generator().manual_seed(0)).tolist() == [4, 0]
    score = CIFAR100().task(A).primary
    assert score.name == "accuracy" and score.higher_is_better
    assert score.value(score.statistics(outputs, torch.tensor([4, 1]))) == 0.5


# -- training end to end ---------------------------------------------------------------------------------
TINY = {"train_size": 16, "val_size": 8, "test_size": 8, "data_seed": 0}


def test_mtl_run_with_every_factor(fixture, registered, caplog):
    root, _ = fixture
    with caplog.at_level(logging.WARNING):
        ds = training.run({"setting": "cifar100", "tasks": [A, B], "setting_options": TINY,
                           "model_options": {"width": 4}, "epochs": 1, "batch_size": 8, "device": "cpu",
                           "aggregator": "pcgrad",
                           "metrics": {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"],
                                       "examples": 16, "sharpness": {"steps": 2, "batch_size": 8},
                                       "coherence": {"small_batch": 4, "large_batch": 16},
                                       "conflict": {"num_batches": 2}}},
                          data_root=root, progress=False)
    assert "vmap per-example gradients failed" not in caplog.text  # the per-example gradients take the fast path
    assert ds.attrs["status"] == "complete" and ds.attrs["setting"] == "cifar100"
    assert list(ds["task"].values) == [A, B] and int(ds["step"][1]) == 2
    for name in ("sharpness", "fisher_trace", "grad_cov_trace", "conflict", "test_score", "train_loss"):
        assert np.isfinite(ds[name].values).all(), name
    assert '"cifar-100-python/train"' in ds.attrs["data_info"]


def test_stl_run(fixture, registered):
    root, _ = fixture
    config = {"setting": "cifar100", "tasks": [B], "setting_options": TINY, "model_options": {"width": 4},
              "epochs": 1, "batch_size": 8, "device": "cpu", "aggregator": "uniform"}
    ds = training.run(config, data_root=root, progress=False)
    assert ds.attrs["mode"] == "stl" and np.isfinite(ds["test_score"].values).all()
    assert 0 <= float(ds["test_score"].sel(epoch=1, task=B)) <= 1
    again = training.run(config, data_root=root, progress=False)  # bit-reproducible
    assert np.array_equal(ds["train_loss"].values, again["train_loss"].values)


def test_augmentation_is_seeded_checkpointed_and_changes_training(fixture, registered, tmp_path, monkeypatch):
    """`augment: true` transforms every training batch from the run's own generator: the same seed gives the same
    run, a killed run resumes bit for bit (the generator is in the checkpoint), and the batches differ from the plain
    run's."""
    from mtlcore.training import trainer as train

    root, _ = fixture
    config = {"setting": "cifar100", "tasks": [A, B], "setting_options": {**TINY, "augment": True},
              "model_options": {"width": 4}, "epochs": 3, "batch_size": 8, "device": "cpu", "optimizer": "sgd"}
    augmented = training.run(config, data_root=root, progress=False)
    assert np.array_equal(augmented["train_loss"].values, training.run(config, data_root=root, progress=False)
                          ["train_loss"].values)
    plain = training.run({**config, "setting_options": TINY}, data_root=root, progress=False)
    assert not np.array_equal(augmented["train_loss"].values[1:], plain["train_loss"].values[1:])
    np.testing.assert_array_equal(augmented["train_loss"].values[0], plain["train_loss"].values[0])  # same start

    original_record = train.Trainer._record

    def killed_in_epoch_2(self):
        if self.epoch == 2:
            raise KeyboardInterrupt
        original_record(self)

    monkeypatch.setattr(train.Trainer, "_record", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        training.run(config, data_root=root, results_dir=tmp_path, progress=False)
    monkeypatch.setattr(train.Trainer, "_record", original_record)
    resumed = training.run(config, data_root=root, results_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(augmented["train_loss"].values, resumed["train_loss"].values)
    with pytest.raises(training.ConfigError, match="augment='yes' must be true or false"):
        training.RunConfig.from_dict({**config, "setting_options": {"augment": "yes"}})
