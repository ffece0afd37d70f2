"""GLUE's data (paper A, Appendix A): eight tasks read from the released TSV files, each task its own examples.

Reads `glue/<Task>/{train,dev}.tsv` under the data root (MNLI's test is `dev_matched.tsv`), the layout that the
GLUE download script (`download_glue_data.py`) makes. As GLUE's own readers, rows are split on tabs with no
quoting (`csv.QUOTE_NONE`): quotes are part of the text. The released dev set serves as the test set (GLUE's test
labels are not public); a validation set is held out from the training file by `data_seed`. Every split is a pure
function of `data_seed` and the sizes, whichever other tasks a run asks for.

The inputs hold the raw text, UTF-8 bytes padded with zeros (`text_a`, `text_b`: N×W uint8), and `pair` (whether
the example is a sentence pair): the tokenizer belongs to the model, which is named in the model options, so the
model tokenises (`model.py`). STS-B's targets are a mapping (`score`, and the example's `position` in its split and
the split's `size`, which Spearman's correlation needs: `scores.py`); the other tasks' targets are class indices.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtlcore._seeding import numpy_rng
from mtlcore.settings.base import Examples, SettingData
from mtlcore.settings.locate import cached_reads, DataNotFoundError, data_root

log = logging.getLogger(__name__)

LAYOUT = "glue"


@dataclass(frozen=True)
class TaskFormat:
    """Where a task's files are and how a row reads: `text_a`, `text_b` (None: single sentence) and `label` are
    header names, or column positions where the file has no header (CoLA); `labels`: the label strings in class
    order (None: a real-valued score)."""

    folder: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    dev_file: str = "dev.tsv"
    header: bool = True


# The label orders of the GLUE processors in Hugging Face transformers (so class indices match theirs).
FORMATS = {
    "cola": TaskFormat("CoLA", 3, None, 1, ("0", "1"), header=False),
    "sst2": TaskFormat("SST-2", "sentence", None, "label", ("0", "1")),
    "mrpc": TaskFormat("MRPC", "#1 String", "#2 String", "Quality", ("0", "1")),
    "stsb": TaskFormat("STS-B", "sentence1", "sentence2", "score", None),
    "qqp": TaskFormat("QQP", "question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": TaskFormat("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                       dev_file="dev_matched.tsv"),
    "qnli": TaskFormat("QNLI", "question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": TaskFormat("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
}
TASKS = tuple(FORMATS)
# Rows (without header) of the released files: train, dev (MNLI: dev_matched).
RELEASE_SIZES = {"cola": (8_551, 1_043), "sst2": (67_349, 872), "mrpc": (3_668, 408), "stsb": (5_749, 1_500),
                 "qqp": (363_846, 40_430), "mnli": (392_702, 9_815), "qnli": (104_743, 5_463), "rte": (2_490, 277)}


def num_outputs(task: str) -> int:
    """The head's outputs: one per class, one for STS-B's score."""
    labels = FORMATS[task].labels
    return 1 if labels is None else len(labels)


def how_to_get(root: Path) -> str:
    return (f"run the GLUE download script (`python download_glue_data.py --data_dir {root / LAYOUT} --tasks all`, "
            "from https://github.com/nyu-mll/GLUE-baselines), which writes this layout; or, with the Hugging Face "
            "`datasets` library, `load_dataset('glue', '<task>')` and write each split as the released TSV.")


def task_files(task: str, root: Path) -> dict[str, Path]:
    folder = root / LAYOUT / FORMATS[task].folder
    return {"train": folder / "train.tsv", "test": folder / FORMATS[task].dev_file}


def missing_files(tasks: list[str], root: Path) -> dict[str, list[Path]]:
    """Task → its missing files (tasks with every file present are left out)."""
    missing = {task: [p for p in task_files(task, root).values() if not p.is_file()] for task in tasks}
    return {task: paths for task, paths in missing.items() if paths}


def check_files(tasks: list[str], root: Path) -> None:
    """Refuse a load whose tasks' files are not all there, naming each missing task, file and folder."""
    missing = missing_files(tasks, root)
    if not missing:
        return
    lines = []
    for task, paths in missing.items():
        line = f"  - {task}: {', '.join(str(p) for p in paths)}"
        if task == "qnli" and all(p.name == "train.tsv" for p in paths):
            line += " (QNLI's dev file is there but not its training file: the offline copy holds QNLI dev only)"
        lines.append(line)
    present = sorted(p.name for p in (root / LAYOUT).iterdir()) if (root / LAYOUT).is_dir() else []
    raise DataNotFoundError(
        f"GLUE task(s) {list(missing)} not found: missing files\n" + "\n".join(lines) +
        f"\n(searched {root / LAYOUT}, which holds {present or 'nothing'}; data root {root}, set by the `data_root` "
        "parameter or $MTLCORE_DATA_DIR). A run may take any subset of the tasks whose files are present.\n"
        f"How to get them: {how_to_get(root)}")


# -- reading the TSVs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """One file's examples: the texts (text_b None for single sentences), the labels (class indices, or float scores
    for STS-B), the rows skipped as malformed, and the file's MD5."""

    text_a: tuple[str, ...]
    text_b: tuple[str, ...] | None
    labels: np.ndarray
    skipped: int
    md5: str


def _column(fmt: TaskFormat, key: str | int, header: list[str], path: Path) -> int:
    if isinstance(key, int):
        return key
    if key not in header:
        raise DataNotFoundError(f"{path}: its header {header} lacks the column {key!r} of GLUE's {fmt.folder} file; "
                                "is it the released file?")
    return header.index(key)


@cached_reads(maxsize=16)
def _read_cached(task: str, path: Path, mtime_ns: int, size: int) -> Rows:
    fmt = FORMATS[task]
    raw = path.read_bytes()
    # utf-8-sig: MRPC's header starts with a byte-order mark, as released.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if fmt.header and rows else []
    columns = [_column(fmt, key, header, path) for key in (fmt.text_a, fmt.text_b, fmt.label) if key is not None]
    width = len(header) if fmt.header else max(columns) + 1
    text_a, text_b, labels, skipped = [], [], [], 0
    for row in rows:
        # A row cut short or split by a stray tab (QQP's training file has a few): GLUE's readers skip it too.
        if len(row) < width or (fmt.header and len(row) != width):
            skipped += 1
            continue
        label = row[columns[-1]]
        if fmt.labels is None:
            try:
                value = float(label)
            except ValueError:
                skipped += 1
                continue
        elif label in fmt.labels:
            value = fmt.labels.index(label)
        else:
            skipped += 1
            continue
        text_a.append(row[columns[0]])
        if fmt.text_b is not None:
            text_b.append(row[columns[1]])
        labels.append(value)
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (wrong number of columns or an unknown label)", path, skipped)
    if not labels:
        raise DataNotFoundError(f"{path} holds no example of GLUE's {fmt.folder} format; download it again: "
                                f"{how_to_get(path.parents[2])}")
    dtype = np.float32 if fmt.labels is None else np.int64
    return Rows(tuple(text_a), tuple(text_b) if fmt.text_b is not None else None, np.array(labels, dtype=dtype),
                skipped, hashlib.md5(raw).hexdigest())


def read_tsv(task: str, path: Path) -> Rows:
    """The examples of one of `task`'s files (cached per process while the file is unchanged)."""
    stat = path.stat()
    return _read_cached(task, path, stat.st_mtime_ns, stat.st_size)


def encode_texts(texts: list[str] | tuple[str, ...]) -> torch.Tensor:
    """UTF-8 bytes of each text, one row per text, padded with zeros (N×W uint8, W ≥ 1)."""
    encoded = [t.encode("utf-8") for t in texts]
    width = max([1, *map(len, encoded)])
    out = np.zeros((len(encoded), width), dtype=np.uint8)
    for i, b in enumerate(encoded):
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return torch.from_numpy(out)


def decode_text(row: np.ndarray) -> str:
    """The text of one row of `encode_texts`."""
    return row.tobytes().rstrip(b"\0").decode("utf-8")


def _examples(task: str, rows: Rows, index: np.ndarray) -> Examples:
    a = [rows.text_a[i] for i in index]
    b = [rows.text_b[i] for i in index] if rows.text_b is not None else [""] * len(index)
    inputs = {"text_a": encode_texts(a), "text_b": encode_texts(b),
              "pair": torch.full((len(index),), rows.text_b is not None)}
    labels = torch.from_numpy(rows.labels[index])
    if FORMATS[task].labels is None:  # STS-B: the score, and where the example sits in its split (for Spearman)
        targets = {"score": labels, "position": torch.arange(len(index)),
                   "size": torch.full((len(index),), len(index), dtype=torch.int64)}
        return Examples(inputs, targets)
    return Examples(inputs, labels)


# -- splits ----------------------------------------------------------------------------------------------
def split_indices(task: str, train_pool: int, test_pool: int, train_size: int, val_size: int, test_size: int,
                  data_seed: int, where: Path | str = "the files") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (ascending) of a task's train and val examples among its `train_pool` training rows, and of its test
    examples among its `test_pool` dev rows. The sizes are caps: a task with fewer rows gives what it has, the
    validation set first (it does not move with train_size)."""
    val = min(val_size, train_pool)
    if train_pool - val < 1:
        raise ValueError(f"GLUE task {task!r}: val_size={val_size} leaves none of the {train_pool} training rows in "
                         f"{where} to train on; lower val_size")
    order = numpy_rng(data_seed, "glue", task, "train-val").permutation(train_pool)
    val_rows = np.sort(order[:val])
    train_rows = np.sort(order[val : val + min(train_size, train_pool - val)])
    test_rows = np.sort(numpy_rng(data_seed, "glue", task, "test").permutation(test_pool)[: min(test_size, test_pool)])
    return train_rows, val_rows, test_rows


def load(tasks: list[str], train_size: int, val_size: int, test_size: int, data_seed: int = 0,
         root: str | Path | None = None, download: bool = True) -> SettingData:
    """Load the GLUE `tasks` (any of TASKS) with at most `*_size` examples per task and split. Nothing is downloaded
    (`download` is accepted for the protocol): a missing task's error says how to get it."""
    root = data_root(root)
    check_files(tasks, root)
    examples: dict[str, dict[str, Examples]] = {split: {} for split in ("train", "val", "test")}
    files_md5, sizes, skipped = {}, {}, {}
    for task in tasks:
        paths = task_files(task, root)
        train, dev = read_tsv(task, paths["train"]), read_tsv(task, paths["test"])
        rows = split_indices(task, len(train.labels), len(dev.labels), train_size, val_size, test_size, data_seed,
                             paths["train"].parent)
        for split, source, index in zip(("train", "val", "test"), (train, train, dev), rows):
            examples[split][task] = _examples(task, source, index)
        for name, source in (("train", train), ("test", dev)):
            key = paths[name].relative_to(root).as_posix()
            files_md5[key] = source.md5
            if source.skipped:
                skipped[key] = source.skipped
        sizes[task] = {split: len(index) for split, index in zip(("train", "val", "test"), rows)}
    info = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "data_seed": data_seed,
            "data_root": str(root), "files_md5": files_md5, "sizes": sizes, "skipped_rows": skipped,
            "labels": {t: list(FORMATS[t].labels) if FORMATS[t].labels else "score" for t in tasks}}
    return SettingData(list(tasks), examples, info=info)
