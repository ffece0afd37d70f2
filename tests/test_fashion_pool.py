"""FashionPool, the many-task pool of §5's analog: every task's labels recomputed from the raw IDX arrays."""
import gzip

import numpy as np
import pytest

from mtlcore import settings
from mtlcore.settings.fashion_pool import data as pool_data

SIZES = {"train_size": 20, "val_size": 10, "test_size": 10, "data_seed": 3}
PAIRS = {"tshirt_vs_shirt": (0, 6), "pullover_vs_coat": (2, 4), "trouser_vs_dress": (1, 3), "sandal_vs_bag": (5, 8),
         "sneaker_vs_boot": (7, 9)}
NOISE = {"noisy_30": 0.3, "noisy_60": 0.6, "noisy_90": 0.9}


def _raw(path, header):
    """An IDX file's payload, read here without the package's reader."""
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read()[header:], dtype=np.uint8)


def raw_lookup(folder, prefixes):
    """image bytes -> the set of original labels of that image in the files."""
    out = {}
    for prefix in prefixes:
        images = _raw(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 784)
        labels = _raw(folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        for image, label in zip(images, labels):
            out.setdefault(image.tobytes(), set()).add(int(label))
    return out


def raw_images(examples, normalization):
    """The uint8 images behind standardised inputs ((raw/255 − mean)/std)."""
    mean, std = normalization
    x = examples.inputs.numpy().reshape(len(examples), 784).astype(np.float64)
    return np.rint((x * std + mean) * 255).astype(np.uint8)


def check_pool(root, options):
    setting = settings.get("fashion_pool")
    loaded = setting.load(list(setting.tasks), options)
    fashion = raw_lookup(root / "fashion-mnist", ["train", "t10k"])
    letters = raw_lookup(root / "notmnist", ["t10k"])
    seen = {}
    for task in setting.tasks:
        for split in ("train", "val", "test"):
            examples = loaded.examples[split][task]
            assert len(examples) == options[f"{split}_size"]
            images = raw_images(examples, loaded.info["normalization"][task])
            labels = examples.targets.numpy()
            lookup = letters if task == "letters" else fashion
            originals = [lookup.get(image.tobytes()) for image in images]
            assert all(o is not None for o in originals), f"{task}/{split}: an image is not in the raw files"
            for image in images:
                key = (task == "letters", image.tobytes())
                assert key not in seen, f"{task}/{split} shares an image with {seen.get(key)}"
                seen[key] = (task, split)
            clear = [len(o) == 1 for o in originals]  # an image the files hold twice under two labels is left out
            original = np.array([min(o) for o in originals])
            if task in PAIRS:
                a, b = PAIRS[task]
                assert all(o <= {a, b} for o in originals)
                assert np.array_equal(labels[clear], (original[clear] == b).astype(int))
            elif task in NOISE:
                # round(p·n) labels are wrong; an image of unclear original label may hide one of them
                wrong, unclear = int((labels[clear] != original[clear]).sum()), len(labels) - sum(clear)
                assert round(NOISE[task] * len(labels)) - unclear <= wrong <= round(NOISE[task] * len(labels))
                assert set(labels.tolist()) <= set(range(10))
            else:
                assert np.array_equal(labels[clear], original[clear]), f"{task}/{split}"
    return loaded


def test_every_task_label_against_the_raw_files(fake_data_root, monkeypatch):
    monkeypatch.setenv("MTLCORE_DATA_DIR", str(fake_data_root))
    loaded = check_pool(fake_data_root, SIZES)
    # The fake files hold distinct images: the noisy tasks flip exactly round(p·n) labels per split.
    for task, p in NOISE.items():
        for split in ("train", "val", "test"):
            examples = loaded.examples[split][task]
            original = np.array([min(v) for v in (raw_lookup(fake_data_root / "fashion-mnist", ["train", "t10k"])[i.tobytes()]
                                                  for i in raw_images(examples, loaded.info["normalization"][task]))])
            assert int((examples.targets.numpy() != original).sum()) == round(p * len(original))


def test_real_files(real_data_root, monkeypatch):
    monkeypatch.setenv("MTLCORE_DATA_DIR", str(real_data_root))
    check_pool(real_data_root, {"train_size": 300, "val_size": 100, "test_size": 200, "data_seed": 0})


def test_a_task_gets_the_same_data_alone_and_with_others(fake_data_root):
    setting = settings.get("fashion_pool")
    alone = setting.load(["fashion"], SIZES, root=fake_data_root)
    together = setting.load(["noisy_90", "sandal_vs_bag", "fashion", "letters"], SIZES, root=fake_data_root)
    for split in ("train", "val", "test"):
        a, b = alone.examples[split]["fashion"], together.examples[split]["fashion"]
        assert np.array_equal(a.inputs.numpy(), b.inputs.numpy()) and np.array_equal(a.targets.numpy(), b.targets.numpy())


def test_noise_at_ninety_percent_makes_labels_uniform_whatever_the_class():
    rng = np.random.default_rng(0)
    original = np.repeat(np.arange(10), 2000)
    labels = pool_data.task_labels("noisy_90", original, rng)
    table = np.histogram2d(original, labels, bins=10)[0] / 2000
    np.testing.assert_allclose(table, 0.1, atol=0.03)


def test_too_large_sizes_say_which_task_and_what_to_lower(fake_data_root):
    with pytest.raises(ValueError, match=r"task 'fashion' needs 3000 images but only 1600 unused ones remain.*lower"):
        settings.get("fashion_pool").load(["fashion"], {"train_size": 1000, "val_size": 1000, "test_size": 1000},
                                          root=fake_data_root)


def test_heads_match_the_classes_and_a_run_trains(fake_data_root):
    from mtlcore import training

    setting = settings.get("fashion_pool")
    model = setting.build_model("lenet", ["fashion", "sandal_vs_bag"])
    assert model.heads["fashion"].out_features == 10 and model.heads["sandal_vs_bag"].out_features == 2
    ds = training.run({"setting": "fashion_pool", "tasks": ["fashion", "sandal_vs_bag", "noisy_30"],
                       "setting_options": SIZES, "epochs": 1, "batch_size": 10, "device": "cpu",
                       "metrics": {"factors": ["conflict"], "examples": 20, "conflict": {"num_batches": 2}}},
                      data_root=fake_data_root, progress=False)
    assert np.isfinite(ds["conflict"].sel(epoch=1).values).all()
    assert np.isfinite(ds["test_score"].sel(epoch=1).values).all()
