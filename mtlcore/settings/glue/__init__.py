"""GLUE (paper A, Appendix A): eight language-understanding tasks (WNLI excluded), a pretrained Hugging Face encoder,
multi-input (each task its own examples).

Tasks: CoLA (acceptability, scored by Matthews correlation), SST-2 (sentiment, accuracy), MRPC (paraphrase, F1 then
accuracy), STS-B (similarity, a regression scored by Pearson then Spearman correlation), QQP (duplicate questions,
F1 then accuracy), MNLI (entailment, accuracy on the matched dev set), QNLI and RTE (entailment, accuracy). The
classification tasks train with the cross-entropy, STS-B with the squared error (a Gaussian likelihood, σ = 1, for
the Fisher). Data and splits: `data.py`; the model and the tokenisation: `model.py`; the metrics: `scores.py`.

The sizes are caps per task: a task gives min(cap, what its files hold), its validation set first. The defaults
take every released example (MNLI's 392,702 training rows are the most), holding 500 training examples out for
validation.
"""
from __future__ import annotations

from pathlib import Path

from mtlcore.settings.base import Setting, Task, concatenate
from mtlcore.settings.classification import CrossEntropy
from mtlcore.settings.glue import data
from mtlcore.settings.glue.model import resolve_encoder, transformer
from mtlcore.settings.glue.scores import SCORES, SquaredError
from mtlcore.settings.locate import DataNotFoundError

DISPLAY_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
                 "qnli": "QNLI", "rte": "RTE"}


def _pad_columns(tensor, width: int):
    if tensor.shape[1] == width:
        return tensor
    padded = tensor.new_zeros((tensor.shape[0], width))
    padded[:, : tensor.shape[1]] = tensor
    return padded


class GLUE(Setting):
    name = "glue"
    display_name = "GLUE"
    tasks = data.TASKS
    display_names = DISPLAY_NAMES
    regime = "multi_input"
    defaults = {"train_size": 400_000, "val_size": 500, "test_size": 50_000, "data_seed": 0}
    models = {"transformer": transformer}
    default_model = "transformer"
    stsb_sigma = 1.0  # σ of STS-B's Gaussian likelihood (the true Fisher's ŷ ∼ N(f(x), σ²)), in score units

    def load(self, tasks, options, root=None, download=True):
        return data.load(self.check_tasks(tasks), **self.resolve_options(options), root=root, download=download)

    def train_size(self, options) -> int:
        """Training examples of the setting's largest task (MNLI as released) under the caps."""
        largest = max(train for train, _ in data.RELEASE_SIZES.values())
        return min(int(options["train_size"]), largest - min(int(options["val_size"]), largest - 1))

    def validate_model_options(self, name, options):
        length = options["max_length"]
        if not (isinstance(length, int) and not isinstance(length, bool) and length >= 2):
            raise ValueError(f"model option max_length={length!r} must be an integer >= 2 (tokens per example, "
                             "special tokens included; 128 is usual for GLUE, 512 the most BERT and RoBERTa take)")
        encoder = options["encoder"]
        if not (isinstance(encoder, str) and encoder.strip()):
            raise ValueError(f"model option encoder={encoder!r} must be a Hugging Face hub name (e.g. roberta-base) or "
                             "a model folder")
        if Path(encoder).expanduser().is_absolute() or encoder.startswith((".", "~")):
            try:  # a folder given by its path must exist before any run starts
                resolve_encoder(encoder)
            except DataNotFoundError as error:
                raise ValueError(str(error)) from None

    def task(self, name: str) -> Task:
        self.check_tasks([name])
        loss = SquaredError(self.stsb_sigma) if name == "stsb" else CrossEntropy()
        return Task(name, loss, SCORES[name])

    def join_inputs(self, inputs):
        """The tasks' text batches padded to the widest text, then concatenated."""
        widths = {key: max(x[key].shape[1] for x in inputs) for key in ("text_a", "text_b")}
        return concatenate([{**x, **{k: _pad_columns(x[k], w) for k, w in widths.items()}} for x in inputs])

    def missing_optional_files(self, root: Path) -> list[str]:
        """Tasks whose files are absent: runs may use the others."""
        missing = data.missing_files(list(data.TASKS), root)
        return [f"GLUE {task}: {', '.join(str(p) for p in paths)} missing; runs of the other tasks work"
                for task, paths in missing.items()]


__all__ = ["GLUE", "CrossEntropy", "SquaredError", "data"]
