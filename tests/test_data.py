"""FashionMTL data: disjoint, seeded splits, label permutation, data root, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlcore import settings
from mtlcore.settings import DataNotFoundError, data_root
from mtlcore.settings.locate import read_idx, write_idx

from conftest import SMALL, write_fake_mnist_folder


class Split:
    def __init__(self, examples):
        self.x, self.y = examples.inputs, examples.targets

    def __len__(self):
        return len(self.y)


class TaskView:
    """One task of the loaded data, split by split, with the standardisation recorded in the data's info."""

    def __init__(self, data, task):
        self.train, self.val, self.test = (Split(data.examples[s][task]) for s in ("train", "val", "test"))
        self.normalization = tuple(data.info["normalization"][task])


class Loaded:
    def __init__(self, data):
        self.info, self.tasks = data.info, {t: TaskView(data, t) for t in data.tasks}


def load(root, tasks=("fashion1", "fashion2", "noisy_fashion", "notmnist"), **options):
    return Loaded(settings.get("fashion_mtl").load(list(tasks), {**SMALL, **options}, root=root, download=False))


def example_ids(task, split: str) -> set[int]:
    """The example numbers the fixture wrote into the first three pixels, read back through the
    task's recorded standardisation."""
    mean, std = task.normalization
    pixels = torch.round((getattr(task, split).x[:, 0, 0, :3].double() * std + mean) * 255).long()
    return set((pixels[:, 0] + 256 * pixels[:, 1] + 65536 * pixels[:, 2]).tolist())


def test_splits_are_disjoint_within_and_across_tasks(fake_data_root):
    s = load(fake_data_root, tasks=("fashion1", "fashion2"))
    parts = {(t, split): example_ids(s.tasks[t], split) for t in ("fashion1", "fashion2") for split in ("train", "val", "test")}
    sizes = {"train": 200, "val": 100, "test": 100}
    for (task, split), found in parts.items():
        assert len(found) == sizes[split], (task, split)  # every example distinct
    keys = list(parts)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not parts[a] & parts[b], (a, b)


def test_splits_are_a_pure_function_of_the_seed(fake_data_root):
    a = load(fake_data_root, tasks=("fashion1",))
    b = load(fake_data_root, tasks=("fashion1", "noisy_fashion", "notmnist"))  # other tasks asked for too
    c = load(fake_data_root, tasks=("fashion1",), data_seed=1)
    assert torch.equal(a.tasks["fashion1"].train.x, b.tasks["fashion1"].train.x)
    assert torch.equal(a.tasks["fashion1"].test.y, b.tasks["fashion1"].test.y)
    assert not torch.equal(a.tasks["fashion1"].train.x, c.tasks["fashion1"].train.x)


def test_noisy_fashion_is_fashion2_with_permuted_labels(fake_data_root):
    s = load(fake_data_root, tasks=("fashion2", "noisy_fashion"))
    clean, noisy = s.tasks["fashion2"], s.tasks["noisy_fashion"]
    for split in ("train", "val", "test"):
        c, n = getattr(clean, split), getattr(noisy, split)
        assert torch.equal(c.x, n.x)  # same images
        assert torch.equal(torch.sort(c.y).values, torch.sort(n.y).values)  # same label multiset
        assert (c.y != n.y).float().mean() > 0.6  # but shuffled: ~90% differ for 10 balanced classes


def test_sizes_and_classes(fake_data_root):
    s = load(fake_data_root)
    for task in s.tasks.values():
        assert (len(task.train), len(task.val), len(task.test)) == (200, 100, 100)
        assert task.train.x.shape[1:] == (1, 28, 28) and sorted(set(task.train.y.tolist())) == list(range(10))
        assert abs(float(task.train.x.mean())) < 1e-4 and abs(float(task.train.x.std()) - 1) < 1e-3


def test_too_large_sizes_name_what_exists(fake_data_root):
    with pytest.raises(ValueError, match=r"only 1200 exist"):
        load(fake_data_root, tasks=("fashion1",), train_size=600)
    # notMNIST's t10k holds 600 here and its optional train files are absent: the error names them
    with pytest.raises(DataNotFoundError, match=r"700 examples need the training files.*train-images-idx3-ubyte"):
        load(fake_data_root, tasks=("notmnist",), train_size=500)


def test_notmnist_splits_do_not_depend_on_optional_files(fake_data_root, tmp_path):
    """Splits are a function of the seed and sizes only: adding notMNIST's train files (a later download) must not
    change a run that t10k alone could serve, or cached results would silently stand for other data."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(fake_data_root, root)
    without = load(root, tasks=("notmnist",)).tasks["notmnist"]
    write_fake_mnist_folder(tmp_path / "extra", 900, 0, seed=3)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(tmp_path / "extra" / name, root / "notmnist" / name)
    with_train = load(root, tasks=("notmnist",))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(without, split).x, getattr(with_train.tasks["notmnist"], split).x)
    assert with_train.info["notmnist_pool"] == "t10k (600 distinct images)"
    larger = load(root, tasks=("notmnist",), train_size=1000)  # 1,200 > 600: now the train files are used
    assert larger.info["notmnist_pool"] == "t10k+train (1500 distinct images)"
    assert len(larger.tasks["notmnist"].train) == 1000


def test_duplicate_images_never_land_on_both_sides_of_a_split(fake_data_root, tmp_path):
    """notMNIST's real t10k file repeats images (one blank one 141 times): each image is used once, with the label
    of its first copy, so no validation or test image is also a training image."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(fake_data_root, root)
    images = read_idx(root / "notmnist" / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(root / "notmnist" / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    copies = rng.integers(0, 300, size=300)  # 300 copies of images among the first 300 (some copied repeatedly)
    images = np.concatenate([images[:300], images[copies]])
    labels = np.concatenate([labels[:300], (labels[copies] + 1) % 10])  # a copy's label is ignored
    rng_order = rng.permutation(600)
    write_idx(root / "notmnist" / "t10k-images-idx3-ubyte.gz", images[rng_order])
    write_idx(root / "notmnist" / "t10k-labels-idx1-ubyte.gz", labels[rng_order])
    task = load(root, tasks=("notmnist",), train_size=100, val_size=50, test_size=50).tasks["notmnist"]
    ids = {split: example_ids(task, split) for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [100, 50, 50]  # distinct within each split
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    # the label kept is the first copy's in file order
    first_label = {}
    for image, label in zip(images[rng_order], labels[rng_order]):
        first_label.setdefault(image.tobytes(), int(label))
    mean, std = task.normalization
    for split in ("train", "val", "test"):
        data = getattr(task, split)
        raw = torch.round((data.x[:, 0].double() * std + mean) * 255).to(torch.uint8).numpy()
        assert [first_label[r.tobytes()] for r in raw] == data.y.tolist()
    with pytest.raises(DataNotFoundError, match="hold only 300 distinct images"):
        load(root, tasks=("notmnist",), train_size=200, val_size=50, test_size=51)


def test_unknown_task_lists_valid_ones(fake_data_root):
    with pytest.raises(ValueError, match=r"valid tasks: \['fashion1', 'fashion2', 'noisy_fashion', 'notmnist'\]"):
        load(fake_data_root, tasks=("fashion3",))


def test_missing_data_names_files_folder_and_remedy(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load(tmp_path, tasks=("fashion1",))
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path / "fashion-mnist") in message
    assert "MTLCORE_DATA_DIR" in message and "mtlcore data" in message


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLCORE_DATA_DIR", str(tmp_path / "env"))
    assert data_root(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    assert data_root() == (tmp_path / "env").resolve()
    monkeypatch.delenv("MTLCORE_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "mtlcore" / "data"


def test_idx_round_trip_and_bad_files(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    # an interrupted download: the gzip stream is cut short; the error names the file and the remedy
    whole = (tmp_path / "a-idx3-ubyte.gz").read_bytes()
    (tmp_path / "cut-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte.gz could not be read .*fetch it again"):
        read_idx(tmp_path / "cut-idx3-ubyte.gz")
    (tmp_path / "odd-idx3").write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + b"\x00" * 7)  # 2 int32s need 8 bytes
    with pytest.raises(ValueError, match=r"odd-idx3: 15 bytes do not hold .* whole 4-byte elements"):
        read_idx(tmp_path / "odd-idx3")


def test_runs_record_the_data_files_and_warn_when_they_are_not_the_release(fake_data_root, caplog):
    from mtlcore.settings.fashion_mtl import data as fashion
    from mtlcore.settings.locate import read_idx_and_md5

    fashion._read_fashion.cache_clear()  # the warning comes once per process, at the first read
    with caplog.at_level("WARNING", logger="mtlcore.settings.fashion_mtl.data"):
        s = load(fake_data_root, tasks=("fashion1", "notmnist"))
    md5 = s.info["files_md5"]
    assert sorted(md5) == sorted([f"fashion-mnist/{n}" for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]
                                 + ["notmnist/t10k-images-idx3-ubyte.gz", "notmnist/t10k-labels-idx1-ubyte.gz"])
    import gzip
    import hashlib
    path = fake_data_root / "notmnist" / "t10k-images-idx3-ubyte.gz"
    assert md5["notmnist/t10k-images-idx3-ubyte.gz"] == hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
    assert read_idx_and_md5(path)[1] == md5["notmnist/t10k-images-idx3-ubyte.gz"]
    assert "is not the Fashion-MNIST release" in caplog.text  # the fixture's files are synthetic


def test_real_fashion_mnist_files(real_data_root):
    """The real release: 60,000 / 10,000 images, 6,000 / 1,000 per class (the release's documentation)."""
    x = read_idx(real_data_root / "fashion-mnist" / "train-images-idx3-ubyte.gz")
    y = read_idx(real_data_root / "fashion-mnist" / "train-labels-idx1-ubyte.gz")
    assert x.shape == (60000, 28, 28) and np.bincount(y).tolist() == [6000] * 10
    s = Loaded(settings.get("fashion_mtl").load(["fashion1", "notmnist"], {"train_size": 1000, "val_size": 100,
                                                                          "test_size": 100}, root=real_data_root,
                                               download=False))
    assert len(s.tasks["notmnist"].train) == 1000
    assert s.info["notmnist_pool"] == "t10k (9804 distinct images)"  # the release repeats 196 of its 10,000
    from mtlcore.settings.fashion_mtl.data import FASHION_MD5
    assert all(s.info["files_md5"][f"fashion-mnist/{name}"] == md5 for name, md5 in FASHION_MD5.items())


def test_standardisation_does_not_depend_on_the_thread_count():
    """A float32 sum split over threads rounds differently per thread count (seen with 16 threads at the paper's
    sizes), which made a run's inputs depend on the machine. The statistics must be the float64 ones, rounded once."""
    from mtlcore.settings.fashion_mtl.data import _standardise

    images = np.random.default_rng(0).integers(0, 256, size=(12000, 28, 28), dtype=np.uint8)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3, 8):
            torch.set_num_threads(n)
            results.append(_standardise([images[:10000], images[10000:]]))
    finally:
        torch.set_num_threads(threads)
    scaled = images[:10000].astype(np.float32) / np.float32(255.0)
    assert results[0][1] == (float(np.float32(scaled.mean(dtype=np.float64))), float(np.float32(scaled.std(dtype=np.float64))))
    for xs, stats in results[1:]:
        assert stats == results[0][1]
        for a, b in zip(xs, results[0][0]):
            assert torch.equal(a, b)
