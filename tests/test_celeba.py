"""The CelebA setting on fixture files in exactly the released formats: 30 real 178×218 JPEGs, list_attr_celeba.txt
(count line, the 40 attribute names, lines of 1/-1 with double spaces) and list_eval_partition.txt."""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcore import settings, training
from mtlcore.settings import DataNotFoundError
from mtlcore.settings.celeba import ACCURACY, F1, LOSS, CelebA, data
from mtlcore.settings.celeba import fixture as fixture_files
from mtlcore.settings.celeba.model import resnet18

N_IMAGES = 30
CODES = fixture_files.partition_codes(N_IMAGES)  # 18 train, 6 valid, 6 test, interleaved
TINY = {"train_size": 18, "val_size": 6, "test_size": 6, "image_size": 16}
THREE = ["Blurry", "Eyeglasses", "Smiling"]
DECODE = data.decode_image
write_celeba = fixture_files.write


@pytest.fixture
def release(tmp_path) -> tuple[Path, list[str], np.ndarray]:
    """(data root, image names, attribute values) of a fresh fixture release under root/celeba/."""
    names, values = write_celeba(tmp_path / "celeba")
    return tmp_path, names, values


@pytest.fixture(scope="module")
def registered():
    """The registry's CelebA is this folder's class."""
    assert type(settings.get("celeba")) is CelebA



def _rows_of(images: torch.Tensor, folder: Path, names: list[str]) -> list[str]:
    """Which fixture image each loaded image is (decoded independently, compared pixel for pixel)."""
    size = images.shape[-1]
    decoded = {name: data.decode_image(folder / data.IMAGE_FOLDER / name, size) for name in names}
    found = []
    for image in images.numpy():
        matches = [name for name, d in decoded.items() if np.array_equal(d, image)]
        assert len(matches) == 1
        found.append(matches[0])
    return found


# -- the setting's declarations ----------------------------------------------------------------------------------
def test_forty_attribute_tasks_with_readable_names():
    setting = CelebA()
    assert setting.name == "celeba" and setting.display_name == "CelebA" and setting.regime == "single_input"
    assert len(setting.tasks) == 40 and setting.tasks[0] == "5_o_Clock_Shadow" and setting.tasks[-1] == "Young"
    assert setting.display_names["5_o_Clock_Shadow"] == "5 o Clock Shadow"
    assert setting.display_names["Wearing_Necktie"] == "Wearing Necktie"
    assert setting.resolve_options({}) == {"train_size": 162_770, "val_size": 19_867, "test_size": 19_962,
                                           "image_size": 64, "data_seed": 0}
    assert setting.train_size(setting.resolve_options({"train_size": 12})) == 12
    with pytest.raises(ValueError, match="image_size"):
        setting.resolve_options({"image_size": 0})
    task = setting.task("Smiling")
    assert [s.name for s in task.scores] == ["accuracy", "f1"] and all(s.higher_is_better for s in task.scores)
    with pytest.raises(ValueError, match="valid tasks"):
        setting.task("smiling")


def test_resnet18_has_512_features_and_a_two_way_head_per_task(one_thread):
    setting = CelebA()
    model = setting.build_model(None, ["Male", "Young"])
    assert model.encoder.out_features == 512 and set(model.heads) == {"Male", "Young"}
    assert all(isinstance(h, torch.nn.Linear) and (h.in_features, h.out_features) == (512, 2)
               for h in model.heads.values())
    assert model.couples_examples  # BatchNorm: the trainer puts a step's batch through the encoder once
    assert model.last_shared_layer()[0] is model.encoder.resnet.layer4[-1].conv2.weight
    narrow = resnet18(["Male"], width=4)
    inputs = {"images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
              "normalization": torch.tensor([[[0.5] * 3, [0.25] * 3]], dtype=torch.float64).expand(2, 2, 3)}
    assert narrow(inputs, "Male").shape == (2, 2) and narrow.encoder.out_features == 32
    with pytest.raises(ValueError, match="width"):
        setting.resolve_model("resnet18", {"width": 0})
    with pytest.raises(TypeError, match="images"):
        narrow(torch.zeros(2, 3, 32, 32), "Male")
    # the trainer's seeded initialisation is ResNet's: He-normal convolutions (fan out), not PyTorch's default
    from mtlcore.training.trainer import seeded_reset

    seeded_reset(model, model.encoder, 3)
    weight = model.encoder.resnet.layer4[0].conv1.weight.detach()  # 512 × 256 × 3 × 3: fan_out 4,608
    assert abs(float(weight.std()) - (2 / 4608) ** 0.5) < 0.05 * (2 / 4608) ** 0.5


# -- data ----------------------------------------------------------------------------------------------------------
def test_targets_and_images_follow_the_files_and_the_official_partition(release):
    root, names, values = release
    loaded = CelebA().load(THREE, TINY, root=root, download=False)
    assert loaded.tasks == THREE and set(loaded.joint) == {"train", "val", "test"}
    for code, split in enumerate(("train", "val", "test")):
        examples = loaded.joint[split]
        images = examples.inputs["images"]
        assert images.dtype == torch.uint8 and images.shape == (int((CODES == code).sum()), 3, 16, 16)
        found = _rows_of(images, root / "celeba", names)
        assert found == [n for n, c in zip(names, CODES) if c == code]  # the partition, in the file's order
        rows = [names.index(n) for n in found]
        for task in THREE:
            targets = examples.targets[task]
            assert targets.dtype == torch.int64
            np.testing.assert_array_equal(targets.numpy(), values[rows, data.TASKS.index(task)] == 1)
            assert torch.equal(loaded.examples[split][task].targets, targets)
    assert loaded.info["partition_sizes"] == {"train": 18, "val": 6, "test": 6}
    assert set(loaded.info["files_md5"]) == {data.ATTR_FILE, data.PARTITION_FILE}


def test_the_lists_parse_alike_with_windows_line_ends(tmp_path):
    write_celeba(tmp_path / "unix")
    write_celeba(tmp_path / "windows", newline="\r\n")
    unix, windows = data.read_lists(tmp_path / "unix"), data.read_lists(tmp_path / "windows")
    for a, b in zip(unix[:3], windows[:3]):
        np.testing.assert_array_equal(a, b)


def test_a_header_that_is_not_the_release_is_refused(release):
    root, _, _ = release
    path = root / "celeba" / data.ATTR_FILE
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Arched_Eyebrows Attractive", "Attractive Arched_Eyebrows")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="header.*'Attractive' vs 'Arched_Eyebrows'"):
        CelebA().load(THREE, TINY, root=root, download=False)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:-1], "line 1 says 30 images but 29"),
    (lambda lines: lines[:5] + [lines[5].replace("  1", "  0", 1)] + lines[6:], "line 6: .* 40 values 1 or -1"),
    (lambda lines: lines[:5] + [lines[5].rsplit(" ", 1)[0]] + lines[6:], "line 6: expected a file name and 40"),
    (lambda lines: lines[:5] + [lines[5].replace(" -1", "--1", 1)] + lines[6:], "must be 1 or -1"),
])
def test_a_damaged_attribute_file_names_the_problem(release, edit, message):
    root, _, _ = release
    path = root / "celeba" / data.ATTR_FILE
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=message):
        CelebA().load(THREE, TINY, root=root, download=False)


def test_caps_take_a_seeded_subset_of_each_partition(release):
    root, names, _ = release
    setting = CelebA()
    options = {**TINY, "train_size": 10, "val_size": 3}

    def train_names(**changes):
        loaded = setting.load(THREE, {**options, **changes}, root=root, download=False)
        assert len(loaded.joint["train"]) == loaded.info["train_size"] and len(loaded.joint["val"]) == 3
        return _rows_of(loaded.joint["train"].inputs["images"], root / "celeba", names)

    first, again, other = train_names(), train_names(), train_names(data_seed=1)
    assert first == again and first != other  # a pure function of data_seed
    train = {n for n, c in zip(names, CODES) if c == 0}
    assert set(first) <= train and set(other) <= train and first == sorted(first)
    assert set(train_names(train_size=5)) <= set(first)  # a smaller cap keeps a subset of a larger one's images
    with pytest.raises(ValueError, match=r"train_size=19 but .*train \(0\) partition holds 18 images"):
        setting.load(THREE, {**options, "train_size": 19}, root=root, download=False)
    with pytest.raises(ValueError, match=r"test_size=7 .* holds 6"):
        setting.load(THREE, {**options, "test_size": 7}, root=root, download=False)


def test_normalisation_uses_the_training_images_statistics_in_float64(release):
    root, _, _ = release
    loaded = CelebA().load(THREE, {**TINY, "train_size": 12}, root=root, download=False)
    train = loaded.joint["train"].inputs["images"].numpy().astype(np.float64) / 255.0
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))  # population std
    np.testing.assert_allclose(loaded.info["normalization"]["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(loaded.info["normalization"]["std"], std, rtol=1e-12)
    stats = np.array(loaded.info["normalization"]["mean"]), np.array(loaded.info["normalization"]["std"])
    model = resnet18(THREE, width=4)
    for split in ("train", "test"):  # validation and test images too: by the training statistics
        inputs = loaded.joint[split].inputs
        assert inputs["normalization"].stride(0) == 0  # one (mean, std) pair shared by every example
        pixels = inputs["images"].numpy()
        exact = ((pixels / 255.0 - stats[0][:, None, None]) / stats[1][:, None, None]).astype(np.float32)
        normalised = model.encoder.normalize(inputs)
        assert normalised.dtype == torch.float32
        np.testing.assert_array_equal(normalised.numpy(), exact)  # float64 arithmetic, rounded once
        expected = ((pixels / 255.0 - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
        np.testing.assert_allclose(normalised.numpy(), expected, rtol=1e-6, atol=1e-6)
        batch = loaded.joint[split].take(torch.tensor([3, 0]))[0]  # as the trainer draws a batch
        np.testing.assert_array_equal(model.encoder.normalize(batch).numpy(), exact[[3, 0]])


# -- the image cache ----------------------------------------------------------------------------------------------
def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(path, size):
        calls.append(Path(path).name)
        return DECODE(path, size)

    monkeypatch.setattr(data, "decode_image", counting)
    return calls


def _refuse_decoding(path, size):
    raise AssertionError(f"decoded {path} although the cache holds it")


def test_images_are_decoded_once_into_a_cache_that_later_loads_reuse(release, monkeypatch):
    root, _, _ = release
    setting = CelebA()
    calls = _count_decodes(monkeypatch)
    first = setting.load(THREE, TINY, root=root, download=False)
    cache = Path(first.info["image_cache"])
    assert len(calls) == 30 and cache.parent == root / "celeba" / data.CACHE_FOLDER
    assert cache.stat().st_size == 30 * 3 * 16 * 16 and cache.with_suffix(".json").is_file()
    assert not [p for p in cache.parent.iterdir() if p.suffix == ".tmp"]

    monkeypatch.setattr(data, "decode_image", _refuse_decoding)
    second = setting.load(["Male"], TINY, root=root, download=False)
    assert torch.equal(second.joint["train"].inputs["images"], first.joint["train"].inputs["images"])
    # a subset of the cached images (a smaller cap) is read from the same cache
    smaller = setting.load(THREE, {**TINY, "train_size": 7}, root=root, download=False)
    assert smaller.info["image_cache"] == str(cache)

    calls = _count_decodes(monkeypatch)  # another image size: another cache
    other = setting.load(THREE, {**TINY, "image_size": 8}, root=root, download=False)
    assert len(calls) == 30 and other.info["image_cache"] != str(cache)
    assert other.joint["val"].inputs["images"].shape[-2:] == (8, 8)


def test_a_truncated_or_interrupted_cache_is_never_used(release, monkeypatch):
    root, _, _ = release
    setting = CelebA()
    good = setting.load(THREE, TINY, root=root, download=False)
    cache = Path(good.info["image_cache"])
    with open(cache, "r+b") as handle:
        handle.truncate(cache.stat().st_size - 100)
    calls = _count_decodes(monkeypatch)
    again = setting.load(THREE, TINY, root=root, download=False)
    assert len(calls) == 30 and cache.stat().st_size == 30 * 3 * 16 * 16
    assert torch.equal(again.joint["test"].inputs["images"], good.joint["test"].inputs["images"])

    # a decode killed part-way leaves neither data nor index that reads as complete
    decode = data.decode_image

    def dies_at_the_tenth(path, size, seen=[]):  # noqa: B006 (a counter shared by the calls)
        seen.append(path)
        if len(seen) == 10:
            raise KeyboardInterrupt
        return decode(path, size)

    monkeypatch.setattr(data, "decode_image", dies_at_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        setting.load(THREE, {**TINY, "image_size": 12}, root=root, download=False)
    assert not list(cache.parent.glob("images_12_*")) and not list(cache.parent.glob(".*.tmp"))
    monkeypatch.setattr(data, "decode_image", decode)
    assert setting.load(THREE, {**TINY, "image_size": 12}, root=root, download=False).joint["train"].inputs[
        "images"].shape[-1] == 12


def test_a_read_only_data_folder_caches_under_the_user_cache(release, monkeypatch, tmp_path_factory, caplog):
    root, _, _ = release
    user_cache = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_cache))
    monkeypatch.setattr(data, "_writable", lambda path: False)
    with caplog.at_level(logging.WARNING, logger="mtlcore.settings.celeba.data"):
        loaded = CelebA().load(THREE, TINY, root=root, download=False)
    assert "is not writable" in caplog.text and str(user_cache) in caplog.text
    assert Path(loaded.info["image_cache"]).is_relative_to(user_cache / "mtlcore")
    monkeypatch.setattr(data, "decode_image", _refuse_decoding)  # found there next time
    CelebA().load(THREE, TINY, root=root, download=False)


# -- missing and damaged files -------------------------------------------------------------------------------------
def test_missing_files_are_named_with_the_folders_searched_and_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        CelebA().load(THREE, TINY, root=tmp_path, download=False)
    message = str(error.value)
    for text in (data.ATTR_FILE, data.PARTITION_FILE, data.IMAGE_FOLDER, str(tmp_path / "celeba"), f"- {tmp_path}\n",
                 "mmlab.ie.cuhk.edu.hk/projects/CelebA.html", "download=True", "quota"):
        assert text in message, text
    (tmp_path / "celeba").mkdir()
    for name in (data.ATTR_FILE, data.PARTITION_FILE, f"{data.IMAGE_FOLDER}.zip"):
        (tmp_path / "celeba" / name).write_text("")
    with pytest.raises(DataNotFoundError, match="unzip it"):
        CelebA().load(THREE, TINY, root=tmp_path, download=False)


def test_a_failed_download_ends_with_the_instructions(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CelebA", offline)
    with pytest.raises(DataNotFoundError, match="mmlab.ie.cuhk.edu.hk"):
        CelebA().load(THREE, TINY, root=tmp_path, download=True)


def test_the_data_root_itself_may_hold_the_release(tmp_path):
    write_celeba(tmp_path)
    loaded = CelebA().load(THREE, TINY, root=tmp_path, download=False)
    assert loaded.info["folder"] == str(tmp_path.resolve()) and len(loaded.joint["train"]) == 18


def test_a_missing_or_corrupt_jpeg_is_named(release):
    root, names, _ = release
    images = root / "celeba" / data.IMAGE_FOLDER
    shutil.move(images / names[3], root / "aside.jpg")
    with pytest.raises(DataNotFoundError, match=names[3]):
        CelebA().load(THREE, TINY, root=root, download=False)
    assert CelebA().missing_optional_files(root) and names[3] in CelebA().missing_optional_files(root)[0]
    shutil.move(root / "aside.jpg", images / names[3])
    assert CelebA().missing_optional_files(root) == []
    (images / names[7]).write_bytes((images / names[7]).read_bytes()[:300])  # cut short
    with pytest.raises(ValueError, match=f"{names[7]} could not be decoded"):
        CelebA().load(THREE, TINY, root=root, download=False)
    assert not list((root / "celeba" / data.CACHE_FOLDER).glob("images_*"))


# -- loss and scores -----------------------------------------------------------------------------------------------
def test_accuracy_and_f1_of_the_positive_class_by_hand():
    # predictions (argmax) 1 1 0 0 1 | 0 1 ; targets 1 0 0 1 1 | 1 1
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0], [3.0, 0.0], [1.0, -1.0], [-2.0, 0.5], [0.2, 0.1], [0.0, 0.3]])
    targets = torch.tensor([1, 0, 0, 1, 1, 1, 1])
    batches = [(logits[:5], targets[:5]), (logits[5:], targets[5:])]
    accuracy = ACCURACY.value(sum(ACCURACY.statistics(o, t) for o, t in batches))
    confusion = sum(F1.statistics(o, t) for o, t in batches)
    assert confusion.tolist() == [3.0, 1.0, 2.0]  # TP, FP, FN over the split
    assert accuracy == pytest.approx(4 / 7)
    assert F1.value(confusion) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # no positive predicted and none present: F1 is 0 by convention
    assert F1.value(F1.statistics(torch.tensor([[1.0, 0.0]] * 3), torch.zeros(3, dtype=torch.int64))) == 0.0
    losses = LOSS(logits, targets)
    assert losses.shape == (7,)
    assert losses[0].item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    samples = LOSS.sample(logits, torch.Generator().manual_seed(0))
    assert samples.shape == (7,) and set(samples.tolist()) <= {0, 1}


# -- end to end ----------------------------------------------------------------------------------------------------
FACTORS = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 8,
           "sharpness": {"steps": 2, "batch_size": 4}, "coherence": {"small_batch": 2, "large_batch": 8},
           "conflict": {"num_batches": 2}}


@pytest.mark.parametrize("aggregator", ["upgrad", "uniform"])
def test_training_runs_end_to_end_and_measures_every_factor(release, registered, one_thread, aggregator):
    root, _, _ = release
    ds = training.run({"setting": "celeba", "tasks": THREE,
                       "setting_options": {"train_size": 12, "val_size": 6, "test_size": 6, "image_size": 16},
                       "model_options": {"width": 4}, "epochs": 1, "batch_size": 4, "device": "cpu",
                       "aggregator": aggregator, "metrics": FACTORS}, data_root=root, progress=False)
    assert ds.attrs["status"] == "complete" and ds.attrs["regime"] == "single_input"
    assert ds.attrs["steps_per_epoch"] == 3 and ds["task"].values.tolist() == THREE
    for variable in ("train_loss", "val_loss", "test_loss", "val_score", "test_score", "sharpness", "fisher_trace",
                     "grad_cov_trace", "conflict"):
        assert np.isfinite(ds[variable].values).all(), variable
    assert ds["primary_score"].values.tolist() == ["accuracy"] * 3
    f1 = ds["test_scores"].sel(score="f1").values
    assert np.isfinite(f1).all() and ((0 <= f1) & (f1 <= 1)).all()
