"""The GLUE setting: the released TSVs read as GLUE's readers do, splits, the Hugging Face encoder (the offline
all-MiniLM-L6-v2 and a tiny random BERT saved as a model folder), GLUE's metrics against scipy and hand-computed
values, the trajectory factors on text, and short STL and MTL runs through the trainer."""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlcore import settings, training
from mtlcore.settings.glue import GLUE, data, model, scores
from mtlcore.settings.locate import DataNotFoundError

REAL_DATA = Path(os.environ.get("MTLCORE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
ENCODER = REAL_DATA / model.DEFAULT_ENCODER
# Row counts (without header) and MD5s of the released files (GLUE's download script).
RELEASED = {"CoLA/train.tsv": (8_551, "c79d4693b8681800338aa044bf9e797b"),
            "CoLA/dev.tsv": (1_043, "c5475ccefc9e7ca0917294b8bbda783c"),
            "SST-2/train.tsv": (67_349, "da409a0a939379ed32a470bc0f7fe99a"),
            "SST-2/dev.tsv": (872, "268856b487b2a31a28c0a93daaff7288"),
            "STS-B/train.tsv": (5_749, "4f7a86dde15fe4832c18e5b970998672"),
            "STS-B/dev.tsv": (1_500, "5f4d6b0d2a5f268b1b56db773ab2f1fe"),
            "RTE/train.tsv": (2_490, "d2844f558d111a16503144bb37a8165f"),
            "RTE/dev.tsv": (277, "973cb4178d4534cf745a01c309d4a66c"),
            "MRPC/train.tsv": (3_668, "dc2dac669a113866a6480a0b10cd50bf"),
            "MRPC/dev.tsv": (408, "185958e46ba556b38c6a7cc63f3a2135")}
SMALL = {"train_size": 24, "val_size": 8, "test_size": 12, "data_seed": 0}

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(scope="module")
def glue_root() -> Path:
    if not all((REAL_DATA / "glue" / name).is_file() for name in RELEASED):
        pytest.skip(f"the released GLUE TSVs (CoLA, SST-2, STS-B, RTE, MRPC) are not under {REAL_DATA / 'glue'} "
                    "(set MTLCORE_DATA_DIR)")
    return REAL_DATA


@pytest.fixture(scope="module")
def encoder_folder() -> Path:
    if not (ENCODER / "model.safetensors").is_file():
        pytest.skip(f"the offline encoder {model.DEFAULT_ENCODER} is not under {REAL_DATA} (set MTLCORE_DATA_DIR)")
    return ENCODER


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) and a small WordPiece vocabulary, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *".,'-?!", *(f"##{c}" for c in letters),
             "the", "a", "is", "man", "of", "and", "to", "in"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def independent_rows(path: Path) -> list[list[str]]:
    """The file's rows split on tabs, no quoting (GLUE's readers), header included."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines()]


# -- tasks and files -------------------------------------------------------------------------------------
def test_registered_tasks_and_unknown_names():
    setting = settings.get("glue")
    assert type(setting) is GLUE and setting.regime == "multi_input"
    assert setting.tasks == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
    assert setting.display_names["stsb"] == "STS-B" and setting.display_names["sst2"] == "SST-2"
    assert [s.name for s in setting.task("mrpc").scores] == ["f1", "accuracy"]
    assert [s.name for s in setting.task("stsb").scores] == ["pearson", "spearman"]
    assert setting.task("cola").primary.name == "mcc" and setting.task("mnli").primary.name == "accuracy"
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['wnli'\].*'cola', 'sst2'"):
        setting.load(["wnli"], {})
    with pytest.raises(ValueError, match="unknown model 'bert'.*valid models: \\['transformer'\\]"):
        setting.resolve_model("bert", {})
    with pytest.raises(ValueError, match="max_length=1 must be an integer >= 2"):
        setting.resolve_model(None, {"max_length": 1})
    assert setting.train_size(setting.resolve_options({})) == 392_702 - 500  # MNLI, the largest task


def test_released_files_read_as_glue_readers_do(glue_root):
    for name, (rows, md5) in RELEASED.items():
        assert hashlib.md5((glue_root / "glue" / name).read_bytes()).hexdigest() == md5, name
    columns = {"cola": (3, None, 1), "sst2": (0, None, 1), "mrpc": (3, 4, 0), "stsb": (7, 8, 9), "rte": (1, 2, 3)}
    for task, (a, b, label) in columns.items():
        for path in data.task_files(task, glue_root).values():
            expected = independent_rows(path)[0 if task == "cola" else 1:]
            read = data.read_tsv(task, path)
            assert len(read.labels) == RELEASED[f"{path.parent.name}/{path.name}"][0] == len(expected)
            assert list(read.text_a) == [r[a] for r in expected]
            assert (read.text_b is None) == (b is None) and (b is None or list(read.text_b) == [r[b] for r in expected])
            if task == "stsb":
                np.testing.assert_array_equal(read.labels, np.array([float(r[label]) for r in expected], np.float32))
            elif task == "rte":
                assert read.labels.tolist() == [["entailment", "not_entailment"].index(r[label]) for r in expected]
            else:
                assert read.labels.tolist() == [int(r[label]) for r in expected]
    # Quotes are text (no quoting), and MRPC's byte-order mark is not part of its first column's name.
    mrpc = data.read_tsv("mrpc", glue_root / "glue" / "MRPC" / "dev.tsv")
    assert mrpc.text_b[0].startswith('" The foodservice pie business') and mrpc.labels[0] == 1
    assert data.read_tsv("cola", glue_root / "glue" / "CoLA" / "train.tsv").text_a[0].startswith("Our friends won't")


def test_splits_are_capped_disjoint_and_a_pure_function_of_the_seed(glue_root):
    setting = GLUE()
    loaded = setting.load(["rte", "stsb"], SMALL, root=glue_root)
    files = {t: {s: data.read_tsv(t, p) for s, p in data.task_files(t, glue_root).items()} for t in ("rte", "stsb")}

    def texts(loaded, task, split):
        inputs = loaded.examples[split][task].inputs
        return [(data.decode_text(a), data.decode_text(b)) for a, b in zip(inputs["text_a"].numpy(),
                                                                              inputs["text_b"].numpy())]

    for task in ("rte", "stsb"):
        source = {s: list(zip(f.text_a, f.text_b)) for s, f in files[task].items()}
        got = {s: texts(loaded, task, s) for s in ("train", "val", "test")}
        assert [len(got[s]) for s in got] == [24, 8, 12]
        assert set(got["train"]) <= set(source["train"]) and set(got["val"]) <= set(source["train"])
        assert not set(got["train"]) & set(got["val"]) and set(got["test"]) <= set(source["test"])
        # The targets are the file's labels of these very texts.
        targets = loaded.examples["test"][task].targets
        labels = targets["score"] if task == "stsb" else targets
        expected = [files[task]["test"].labels[source["test"].index(pair)] for pair in got["test"]]
        np.testing.assert_array_equal(labels.numpy(), np.array(expected))
        assert loaded.examples["test"][task].inputs["pair"].all()
    alone = setting.load(["stsb"], SMALL, root=glue_root)
    assert texts(alone, "stsb", "val") == texts(loaded, "stsb", "val")  # other tasks change nothing
    fewer = setting.load(["stsb"], {**SMALL, "train_size": 10}, root=glue_root)
    assert texts(fewer, "stsb", "val") == texts(loaded, "stsb", "val")  # val does not move with train_size
    assert set(texts(fewer, "stsb", "train")) < set(texts(loaded, "stsb", "train"))
    assert texts(setting.load(["stsb"], {**SMALL, "data_seed": 1}, root=glue_root), "stsb", "val") != \
        texts(loaded, "stsb", "val")
    capped = setting.load(["rte"], {"train_size": 10**6, "val_size": 100, "test_size": 10**6}, root=glue_root)
    assert capped.info["sizes"]["rte"] == {"train": 2_390, "val": 100, "test": 277}  # caps: what the files hold
    sst2 = setting.load(["sst2"], SMALL, root=glue_root).examples["train"]["sst2"]
    assert not sst2.inputs["pair"].any() and sst2.targets.dtype == torch.int64
    stsb = loaded.examples["val"]["stsb"].targets
    assert stsb["position"].tolist() == list(range(8)) and stsb["size"].tolist() == [8] * 8
    with pytest.raises(ValueError, match="val_size=2490 leaves none of the 2490 training rows"):
        setting.load(["rte"], {**SMALL, "val_size": 2_490}, root=glue_root)


MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1"]


def write_released_layout(root: Path) -> None:
    """QQP, MNLI and QNLI files with the released headers and columns (not available offline): 12 rows each, QQP's
    training file with a row cut short as in the release."""
    def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")

    nli = ["contradiction", "entailment", "neutral"]
    for name in ("train.tsv", "dev.tsv"):
        rows = [[str(i), str(2 * i), str(2 * i + 1), f'How do I "{name}" {i}?', f"Question {i}", str(i % 2)]
                for i in range(12)]
        if name == "train.tsv":
            rows.insert(5, ["99", "1", "2", "a question cut short"])
        write(root / "glue" / "QQP" / name, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], rows)
        write(root / "glue" / "QNLI" / name, ["index", "question", "sentence", "label"],
              [[str(i), f"q{i}?", f"s{i}.", ["entailment", "not_entailment"][i % 2]] for i in range(12)])
    for name, extra in (("train.tsv", []), ("dev_matched.tsv", ["label2", "label3", "label4", "label5"])):
        write(root / "glue" / "MNLI" / name, [*MNLI_COLUMNS, *extra, "gold_label"],
              [[str(i), "0", f"{i}e", "fiction", "( parse )", "( parse )", "(ROOT)", "(ROOT)", f"premise {i}",
                f"hypothesis {i}", nli[i % 3], *([nli[i % 3]] * len(extra)), nli[i % 3]] for i in range(12)])


def test_qqp_mnli_and_qnli_files_in_the_released_layout(tmp_path, caplog):
    write_released_layout(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = GLUE().load(["qqp", "mnli", "qnli"], {"train_size": 100, "val_size": 2, "test_size": 100},
                             root=tmp_path)
    assert loaded.info["sizes"]["qqp"] == {"train": 10, "val": 2, "test": 12}  # the short row is skipped
    assert loaded.info["skipped_rows"] == {"glue/QQP/train.tsv": 1} and "skipped 1 malformed row" in caplog.text
    test = loaded.examples["test"]
    assert data.decode_text(test["qqp"].inputs["text_a"][3].numpy()) == 'How do I "dev.tsv" 3?'  # quotes kept
    assert test["qqp"].targets.tolist() == [i % 2 for i in range(12)]
    assert test["mnli"].targets.tolist() == [i % 3 for i in range(12)]  # contradiction, entailment, neutral
    assert data.decode_text(test["mnli"].inputs["text_b"][4].numpy()) == "hypothesis 4"
    assert test["qnli"].targets.tolist() == [i % 2 for i in range(12)] and "glue/MNLI/dev_matched.tsv" in \
        loaded.info["files_md5"]


def test_missing_tasks_are_named_with_files_folders_and_how_to_get_them(glue_root, tmp_path):
    for folder in ("CoLA", "QNLI"):
        shutil.copytree(glue_root / "glue" / folder, tmp_path / "glue" / folder)
    (tmp_path / "glue" / "QNLI" / "train.tsv").unlink(missing_ok=True)
    with pytest.raises(DataNotFoundError) as error:
        GLUE().load(["cola", "qqp", "qnli", "mnli"], SMALL, root=tmp_path)
    message = str(error.value)
    assert "GLUE task(s) ['qqp', 'qnli', 'mnli'] not found" in message
    for needed in (tmp_path / "glue" / "QQP" / "train.tsv", tmp_path / "glue" / "MNLI" / "dev_matched.tsv",
                   tmp_path / "glue" / "QNLI" / "train.tsv", "QNLI dev only", "download_glue_data.py",
                   "load_dataset('glue'", "CoLA"):
        assert str(needed) in message
    assert "cola:" not in message  # present tasks are not reported
    assert GLUE().load(["cola"], SMALL, root=tmp_path).examples["test"]["cola"].targets.shape == (12,)
    notes = GLUE().missing_optional_files(tmp_path)
    assert len(notes) == 7 and any("qnli" in n for n in notes)


def test_missing_encoder_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MTLCORE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=f"encoder '{model.DEFAULT_ENCODER}' not found.*"
                                                f"{tmp_path / model.DEFAULT_ENCODER}.*sentence-transformers"):
        GLUE().build_model(None, ["rte"])
    with pytest.raises(DataNotFoundError, match="encoder '/no/such/encoder' not found: searched the folders /no/such"):
        model.resolve_encoder("/no/such/encoder")
    with pytest.raises(ValueError, match="encoder '/no/such/encoder' not found"):
        GLUE().build_model(None, ["rte"], {"encoder": "/no/such/encoder"})
    with pytest.raises(training.ConfigError, match="encoder '/no/such/encoder' not found"):  # before any run starts
        training.RunConfig.from_dict({"setting": "glue", "tasks": ["rte"], "model_options": {"encoder": "/no/such/encoder"}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="empty has no config.json"):
        model.resolve_encoder(str(tmp_path / "empty"))
    assert model.resolve_encoder("roberta-base") == ("roberta-base", False)  # a hub name: nothing checked locally



def test_the_default_encoder_is_found_under_the_runs_data_root(encoder_folder, tmp_path, monkeypatch):
    """`training.run(..., data_root=...)` passes its data root to the model: no environment variable needed."""
    monkeypatch.setenv("MTLCORE_DATA_DIR", str(tmp_path))  # elsewhere: only the run's root can find the encoder
    built = GLUE().build_model(None, ["rte"], root=encoder_folder.parent)
    assert built.encoder is not None
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['root'\]"):
        GLUE().resolve_model(None, {"root": str(encoder_folder.parent)})
    assert "root" not in GLUE().resolve_model(None, {})[1]  # not in a run's options, nor in its hash

# -- metrics ---------------------------------------------------------------------------------------------
def summed(score, outputs, targets, cuts):
    """The score over batches cut at `cuts`, statistics summed as the evaluation does."""
    bounds = [0, *cuts, len(outputs)]
    parts = []
    for start, end in itertools.pairwise(bounds):
        target = {k: v[start:end] for k, v in targets.items()} if isinstance(targets, dict) else targets[start:end]
        parts.append(score.statistics(outputs[start:end], target).double())
    return score.value(sum(parts))


def test_classification_scores_against_hand_computed_values():
    # tp = 3, fp = 1, fn = 2, tn = 4 for class 1
    predicted = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    actual = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    logits = torch.nn.functional.one_hot(predicted, 2).float()
    assert math.isclose(summed(scores.MCC, logits, actual, [3, 7]), 10 / math.sqrt(4 * 5 * 5 * 6), rel_tol=1e-12)
    assert math.isclose(summed(scores.F1, logits, actual, [5]), 6 / 9, rel_tol=1e-12)
    assert math.isclose(summed(scores.BINARY_ACCURACY, logits, actual, [1]), 0.7, rel_tol=1e-12)
    assert math.isclose(summed(scores.ACCURACY, logits, actual, [4]), 0.7, rel_tol=1e-12)
    everything_zero = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.int64), 2).float()
    assert summed(scores.MCC, everything_zero, torch.tensor([0, 1, 0, 1]), []) == 0.0  # sklearn's convention
    assert summed(scores.F1, everything_zero, torch.zeros(4, dtype=torch.int64), []) == 0.0
    three_way = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert summed(scores.ACCURACY, three_way, torch.tensor([1, 0, 0]), [1]) == 2 / 3


def test_correlations_against_scipy_over_uneven_batches():
    from scipy import stats

    generator = torch.Generator().manual_seed(3)
    n = 101
    targets = torch.round(torch.rand(n, generator=generator) * 25) / 5  # 0..5 in steps of 0.2: many ties
    outputs = (targets + torch.randn(n, generator=generator)).unsqueeze(1)
    outputs[:10] = 2.0  # tied predictions too
    placed = {"score": targets, "position": torch.arange(n), "size": torch.full((n,), n)}
    order = torch.randperm(n, generator=generator)  # batches of examples in any order
    shuffled = ({k: v[order] for k, v in placed.items()}, outputs[order])
    for out, tgt in ((outputs, placed), (shuffled[1], shuffled[0])):
        pearson = summed(scores.PEARSON, out, tgt, [7, 50, 51])
        spearman = summed(scores.SPEARMAN, out, tgt, [30, 64])
        assert math.isclose(pearson, stats.pearsonr(outputs[:, 0].double(), targets.double())[0], rel_tol=1e-9)
        assert math.isclose(spearman, stats.spearmanr(outputs[:, 0].double(), targets.double())[0], rel_tol=1e-9)
    np.testing.assert_array_equal(scores.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    constant = torch.full((5, 1), 2.5)
    five = {k: v[:5] for k, v in {**placed, "size": torch.full((n,), 5)}.items()}
    assert summed(scores.PEARSON, constant, five, [2]) == 0.0 == summed(scores.SPEARMAN, constant, five, [])
    twice = scores.SPEARMAN.statistics(outputs[:5], five).double() * 2
    with pytest.raises(ValueError, match="counted more than once"):
        scores.SPEARMAN.value(twice)


def test_squared_error_is_a_gaussian_likelihood():
    sigma = 0.5
    loss = scores.SquaredError(sigma)
    outputs = torch.tensor([[1.0], [2.0], [4.5]], requires_grad=True)
    targets = {"score": torch.tensor([1.5, 2.0, 3.0])}
    torch.testing.assert_close(loss(outputs, targets), torch.tensor([0.25, 0.0, 2.25]))
    # fisher_scale × ‖∇ loss‖² = ‖∇ −log N(y; f, σ²)‖², per example
    grads = torch.autograd.grad(loss(outputs, targets).sum(), outputs)[0]
    nll = -torch.distributions.Normal(outputs.squeeze(1), sigma).log_prob(targets["score"])
    nll_grads = torch.autograd.grad(nll.sum(), outputs)[0]
    torch.testing.assert_close(loss.fisher_scale * grads.pow(2), nll_grads.pow(2))
    draws = loss.sample(torch.full((20_000, 1), 3.0), torch.Generator().manual_seed(0))["score"]
    assert abs(float(draws.mean()) - 3.0) < 0.02 and abs(float(draws.std()) - sigma) < 0.02
    assert GLUE().task("stsb").loss.fisher_scale == 0.25  # σ = 1
    with pytest.raises(ValueError, match="sigma=0 must be a positive number"):
        scores.SquaredError(0)


# -- the model -------------------------------------------------------------------------------------------
def reference_features(folder: Path, pairs: list[tuple[str, str | None]], max_length: int) -> torch.Tensor:
    """The first token's final hidden state computed by transformers alone (its tokenizer pads the batch)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    reference = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    encoded = tokenizer(first, second if second[0] is not None else None, padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return reference(**encoded).last_hidden_state[:, 0]


def inputs_of(pairs):
    return {"text_a": data.encode_texts([a for a, _ in pairs]), "text_b": data.encode_texts([b or "" for _, b in pairs]),
            "pair": torch.tensor([b is not None for _, b in pairs])}


def test_offline_encoder_gives_transformers_features_with_dynamic_padding(encoder_folder):
    glue_model = GLUE().build_model(None, ["stsb", "mnli", "rte"], {"encoder": str(encoder_folder), "max_length": 24})
    assert glue_model.pretrained_encoder and glue_model.encoder.token_types
    assert glue_model.encoder.transformer.dtype == torch.float32 and glue_model.encoder.transformer.pooler is None
    assert [glue_model.heads[t].out_features for t in ("stsb", "mnli", "rte")] == [1, 3, 2]
    assert glue_model.last_shared_layer()[0] is glue_model.encoder.transformer.encoder.layer[-1].output.dense.weight
    assert glue_model.describe(torch.device("cpu"))["architecture"] == "BertModel"
    pairs = [("A man is playing a guitar.", "Someone plays an instrument."),
             ("Short.", ("A much longer second sentence that the tokenizer truncates because it has many words in it "
                         "and goes on.")), ("Ünïcode “quotes” and ' apostrophes.", "x")]
    glue_model.eval()
    with torch.no_grad():
        features = glue_model.encoder(inputs_of(pairs))
        alone = torch.cat([glue_model.encoder(inputs_of([p])) for p in pairs])
    torch.testing.assert_close(features, reference_features(encoder_folder, pairs, 24), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(features, alone, atol=2e-5, rtol=1e-4)  # padding changes nothing
    ids, _, mask = glue_model.encoder.tokenize(**inputs_of(pairs))
    assert ids.shape[1] == 24 and mask.sum(1).max() == 24 and mask[0].sum() < 24  # padded to the longest, truncated
    single = [("it 's a charming and often affecting journey .", None)]
    with torch.no_grad():
        torch.testing.assert_close(glue_model.encoder(inputs_of(single)),
                                   reference_features(encoder_folder, single, 24), atol=2e-5, rtol=1e-4)


def test_tiny_encoder_per_example_gradients_vmap_equals_loop(tiny_folder):
    from mtlcore.metrics.per_example import per_example_gradients

    glue_model = GLUE().build_model(None, ["stsb", "rte"], {"encoder": str(tiny_folder), "max_length": 16})
    pairs = [("the man is a man.", "a man"), ("x", "the end of the sentence is here, far away"), ("a b c", "d")]
    x = inputs_of(pairs)
    regression = {"score": torch.tensor([1.0, 4.0, 2.5]), "position": torch.arange(3), "size": torch.full((3,), 3)}
    for task, targets in (("stsb", regression), ("rte", torch.tensor([0, 1, 1]))):
        loss = GLUE().task(task).loss
        vmapped = per_example_gradients(glue_model, task, x, targets, loss=loss, method="vmap", chunk_size=2)
        looped = per_example_gradients(glue_model, task, x, targets, loss=loss, method="loop")
        assert vmapped.shape == (3, sum(p.numel() for p in [*glue_model.shared_parameters(),
                                                              *glue_model.task_parameters(task)]))
        torch.testing.assert_close(vmapped, looped, atol=1e-5, rtol=1e-4)
        assert looped.norm(dim=1).min() > 0


def test_evaluation_chunks_by_length_give_each_example_its_own_features(tiny_folder, monkeypatch):
    glue_model = GLUE().build_model(None, ["rte"], {"encoder": str(tiny_folder), "max_length": 32}).eval()
    words = "the man is a man of the end and in to".split()
    rng = np.random.default_rng(0)
    pairs = [(" ".join(rng.choice(words, rng.integers(1, 12))), " ".join(rng.choice(words, rng.integers(1, 9))))
             for _ in range(11)]
    monkeypatch.setattr(model, "NO_GRAD_CHUNK", 4)
    with torch.no_grad():
        chunked = glue_model.encoder(inputs_of(pairs))  # 3 chunks of similar length, in another order
        alone = torch.cat([glue_model.encoder(inputs_of([p])) for p in pairs])
    with_grad = glue_model.encoder(inputs_of(pairs)).detach()  # one batch padded to its longest example
    lengths = glue_model.encoder.tokenize(**inputs_of(pairs))[2].sum(1)
    assert len(set(lengths.tolist())) > 3  # the chunks differ in length
    torch.testing.assert_close(chunked, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, with_grad, atol=1e-5, rtol=1e-4)


def test_each_text_is_tokenised_once_per_process(tiny_folder, monkeypatch):
    encoder = GLUE().build_model(None, ["rte"], {"encoder": str(tiny_folder), "max_length": 12}).encoder
    pairs = [("the man", "a man"), ("a b", "the end"), ("the man", "a man")]
    first = encoder.tokenize(**inputs_of(pairs))
    assert torch.equal(first[0][0], first[0][2])
    calls = []
    original = type(encoder.tokenizer).__call__
    monkeypatch.setattr(type(encoder.tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    again = encoder.tokenize(**inputs_of(pairs[1:]))
    assert calls == [] and torch.equal(again[0], first[0][1:])  # from the cache
    encoder.tokenize(**inputs_of([("the man", "a man"), ("new text", "here")]))
    assert calls == [(["new text"], ["here"])]  # only the text not seen yet
    other_length = GLUE().build_model(None, ["rte"], {"encoder": str(tiny_folder), "max_length": 4}).encoder
    assert other_length.tokenize(**inputs_of(pairs[:1]))[0].shape == (1, 4)  # the cache is per max_length


def test_a_tiny_roberta_with_the_roberta_base_tokenizer(tmp_path):
    """The paper's encoder family: RoBERTa has no segment ids and pads with id 1 (the tokenizer is roberta-base's,
    the weights a small random RobertaModel)."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer_folder = REAL_DATA / "roberta-base-tokenizer"
    if not (tokenizer_folder / "tokenizer.json").is_file():
        pytest.skip(f"the roberta-base tokenizer is not under {REAL_DATA} (set MTLCORE_DATA_DIR)")
    folder = tmp_path / "tiny-roberta"
    shutil.copytree(tokenizer_folder, folder)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=50_265, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
                 ).save_pretrained(folder)
    glue_model = GLUE().build_model(None, ["mnli"], {"encoder": str(folder), "max_length": 24})
    assert not glue_model.encoder.token_types
    pairs = [("The cat sat.", "A cat was sitting on the mat all day long."), ("Yes", "No")]
    glue_model.eval()
    ids, _, mask = glue_model.encoder.tokenize(**inputs_of(pairs))
    assert ids[0, 0] == 0 and (ids[1][mask[1] == 0] == 1).all()  # <s> first, padding id 1
    with torch.no_grad():
        torch.testing.assert_close(glue_model.encoder(inputs_of(pairs)), reference_features(folder, pairs, 24),
                                   atol=2e-5, rtol=1e-4)


# -- training and factors end to end ---------------------------------------------------------------------
FACTORS = {"factors": ["sharpness", "fisher_trace", "coherence", "conflict"], "examples": 16,
           "sharpness": {"steps": 2, "batch_size": 8}, "coherence": {"small_batch": 4, "large_batch": 16},
           "conflict": {"num_batches": 2}}


def test_mtl_run_with_every_factor_on_the_tiny_encoder(glue_root, tiny_folder, caplog):
    config = {"setting": "glue", "tasks": ["rte", "stsb"], "setting_options": {**SMALL, "train_size": 16},
              "model_options": {"encoder": str(tiny_folder), "max_length": 32}, "epochs": 1, "batch_size": 8,
              "device": "cpu", "optimizer": "adam", "lr": 1e-3, "metrics": FACTORS}
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = training.run(config, data_root=glue_root, progress=False)
    assert "vmap per-example gradients failed" not in caplog.text  # the per-example gradients take the fast path
    assert ds.attrs["status"] == "complete" and ds.attrs["mode"] == "mtl"
    again = training.run({**config, "metrics": {}}, data_root=glue_root, progress=False)
    np.testing.assert_array_equal(ds["train_loss"].values, again["train_loss"].values)  # bit-reproducible
    for name in ("sharpness", "fisher_trace", "grad_cov_trace", "conflict", "train_loss", "test_score"):
        assert np.isfinite(ds[name].values).all(), name
    assert (ds["fisher_trace"].values > 0).all() and (ds["sharpness"].values >= 0).all()
    scores_ = ds["test_scores"].sel(epoch=1, task="stsb")
    assert -1 <= float(scores_.sel(score="pearson")) <= 1 and -1 <= float(scores_.sel(score="spearman")) <= 1


def test_stl_and_mtl_runs_with_the_offline_encoder(glue_root, encoder_folder):
    config = {"setting": "glue", "tasks": ["sst2"], "setting_options": {**SMALL, "train_size": 16},
              "model_options": {"encoder": str(encoder_folder), "max_length": 32}, "epochs": 1, "batch_size": 8,
              "device": "cpu", "optimizer": "adam", "lr": 1e-4}
    stl = training.run(config, data_root=glue_root, progress=False)
    mtl = training.run({**config, "tasks": ["sst2", "cola"]}, data_root=glue_root, progress=False)
    assert stl.attrs["mode"] == "stl" and mtl.attrs["mode"] == "mtl"
    for ds in (stl, mtl):
        assert ds.attrs["status"] == "complete" and np.isfinite(ds["train_loss"].values).all()
        assert 0 <= float(ds["test_score"].sel(epoch=1, task="sst2")) <= 1
    assert -1 <= float(mtl["test_score"].sel(epoch=1, task="cola")) <= 1
    # The same start: the pretrained encoder is kept and the sst2 head is seeded by the task alone.
    np.testing.assert_allclose(stl["train_loss"].sel(epoch=0, task="sst2"), mtl["train_loss"].sel(epoch=0, task="sst2"),
                               rtol=1e-6)
    assert '"glue/SST-2/train.tsv"' in mtl.attrs["data_info"]
