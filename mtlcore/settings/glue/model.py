"""GLUE's model (paper A, Appendix A): a Hugging Face encoder shared by every task, a linear head per task on the
first token's representation ([CLS] in BERT, <s> in RoBERTa).

The encoder is named once, in the model option `encoder`: a local folder (loaded with `local_files_only`, never
downloaded), a folder name under the data root, or a Hugging Face hub name (fetched by transformers unless its
cache has it); the same name gives the tokenizer. The default is the 6-layer BERT encoder all-MiniLM-L6-v2 in
the folder `all-MiniLM-L6-v2-fp16` under the data root (weights stored in float16, loaded as float32); the paper
uses `roberta-base`.

The model tokenises: the data holds the raw text (UTF-8 bytes, `data.py`), since the tokenizer is the model's.
Each example's tokens are cached in memory, per process and per (tokenizer, max_length), so that every text is
tokenised once. A batch is padded to its own longest example (dynamic padding; without gradients, as in evaluation,
it goes through in chunks of similar length, each padded to its own longest), and the transformer gets an
explicit additive attention mask, which keeps its forward free of data-dependent branches: per-example gradients
then run under torch.func's vmap (the tokenisation is a custom function with its own batching rule).
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtlcore.settings.base import MultiTaskModel
from mtlcore.settings.glue.data import num_outputs
from mtlcore.settings.locate import DataNotFoundError, data_root

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2-fp16"
DEFAULT_ENCODER_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"


# -- finding and loading the encoder --------------------------------------------------------------------
def resolve_encoder(name: str, root: str | Path | None = None) -> tuple[str, bool]:
    """(what to pass to `from_pretrained`, whether it is a local folder). A name that is a folder, or a folder under
    the data root (`root`, else $MTLCORE_DATA_DIR or the user cache), is local; a path-like name (absolute, ./, ~) or
    the default that is neither is refused with the folders searched; any other name is a hub name."""
    path = Path(name).expanduser()
    root = data_root(root)
    for candidate in (path, root / name):
        if candidate.is_dir():
            if not (candidate / "config.json").is_file():
                raise DataNotFoundError(f"encoder folder {candidate} has no config.json: not a Hugging Face model "
                                        "folder (it needs config.json, the weights and the tokenizer files)")
            return str(candidate.resolve()), True
    if path.is_absolute() or name.startswith((".", "~")) or name == DEFAULT_ENCODER:
        how = (f"it is the Hugging Face model {DEFAULT_ENCODER_SOURCE} (its files, weights in any float dtype)"
               if name == DEFAULT_ENCODER else "give an existing folder, or a Hugging Face hub name such as roberta-base")
        raise DataNotFoundError(f"encoder {name!r} not found: searched the folders {path.resolve()} and {root / name} "
                                f"(data root {root}, set by $MTLCORE_DATA_DIR). {how}")
    return name, False


_TOKENIZERS: dict[tuple[str, bool], object] = {}


def load_tokenizer(source: str, local: bool):
    """The tokenizer of `source`, loaded once per process."""
    from transformers import AutoTokenizer

    key = (source, local)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(source, local_files_only=local)
    return _TOKENIZERS[key]


def load_transformer(source: str, local: bool) -> nn.Module:
    """The pretrained encoder in float32, without its pooler (the heads read the first token)."""
    from transformers import AutoModel

    if not local:
        log.info("loading encoder %r from the Hugging Face hub (downloaded unless in its cache)", source)
    model = AutoModel.from_pretrained(source, local_files_only=local, dtype=torch.float32)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


# -- tokenising -----------------------------------------------------------------------------------------
# tokenizer → max_length → example key → (input ids, token type ids)
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text(row: np.ndarray) -> bytes:
    return row.tobytes().rstrip(b"\0")


class _Tokenize(torch.autograd.Function):
    """Text bytes → (input ids, token type ids, attention mask), padded to the longest example. Its vmap rule tokenises
    every vmapped example in one call, so that per-example gradients can run under torch.func."""

    @staticmethod
    def forward(encoder, text_a, text_b, pair):
        return encoder.tokenize(text_a, text_b, pair)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    @staticmethod
    def backward(ctx, *grads):
        return None, None, None, None

    @staticmethod
    def vmap(info, in_dims, encoder, text_a, text_b, pair):
        def leading(tensor, dim):
            return tensor.movedim(dim, 0) if dim is not None else tensor.expand(info.batch_size, *tensor.shape)

        a, b, p = (leading(t, d) for t, d in zip((text_a, text_b, pair), in_dims[1:]))
        size = a.shape[:2]
        out = encoder.tokenize(a.flatten(0, 1), b.flatten(0, 1), p.flatten(0, 1))
        return tuple(t.unflatten(0, size) for t in out), (0, 0, 0)


# Examples per forward pass when no gradient is taken (evaluation): chunks of similar length.
NO_GRAD_CHUNK = 32


class TextEncoder(nn.Module):
    """Tokenizer and transformer: the setting's text inputs → the first token's final hidden state (N × hidden)."""

    def __init__(self, transformer: nn.Module, tokenizer, max_length: int = 128, name: str = ""):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self.out_features = transformer.config.hidden_size
        # BERT's segment ids; RoBERTa has a single segment and its tokenizer gives none.
        self.token_types = ("token_type_ids" in tokenizer.model_input_names
                            and getattr(transformer.config, "type_vocab_size", 1) > 1)

    def tokenize(self, text_a: torch.Tensor, text_b: torch.Tensor, pair: torch.Tensor):
        """(input ids, token type ids, attention mask), int64 N×L on the inputs' device, L the longest example."""
        cache = _TOKEN_CACHE.setdefault(self.tokenizer, {}).setdefault(self.max_length, {})
        a, b, p = (t.detach().cpu().numpy() for t in (text_a, text_b, pair))
        keys = [(_text(a[i]), _text(b[i]) if p[i] else None) for i in range(len(a))]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        for is_pair in (False, True):
            group = [k for k in missing if (k[1] is not None) == is_pair]
            if not group:
                continue
            first = [k[0].decode("utf-8") for k in group]
            second = [k[1].decode("utf-8") for k in group] if is_pair else None
            encoded = self.tokenizer(first, second, truncation=True, max_length=self.max_length,
                                     return_token_type_ids=True)
            for key, ids, types in zip(group, encoded["input_ids"], encoded["token_type_ids"]):
                cache[key] = (ids, types)
        length = max([1, *(len(cache[k][0]) for k in keys)])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = np.full((len(keys), length), pad, dtype=np.int64)
        types = np.zeros((len(keys), length), dtype=np.int64)
        mask = np.zeros((len(keys), length), dtype=np.int64)
        for i, key in enumerate(keys):
            row_ids, row_types = cache[key]
            ids[i, : len(row_ids)], types[i, : len(row_ids)], mask[i, : len(row_ids)] = row_ids, row_types, 1
        return tuple(torch.from_numpy(x).to(text_a.device) for x in (ids, types, mask))

    def forward(self, inputs) -> torch.Tensor:
        if not isinstance(inputs, dict) or not {"text_a", "text_b", "pair"} <= set(inputs):
            raise TypeError("the GLUE encoder takes the setting's inputs, a mapping with text_a, text_b (N×W UTF-8 "
                            f"bytes) and pair (N); got {type(inputs).__name__}")
        ids, types, mask = _Tokenize.apply(self, inputs["text_a"], inputs["text_b"], inputs["pair"])
        if torch.is_grad_enabled() or len(ids) <= NO_GRAD_CHUNK:
            return self._encode(ids, types, mask)
        # Without gradients (evaluation), examples go through in chunks of similar length, each padded only to its
        # own longest example: the masked padding changes nothing but the cost (2-4x on GLUE's short sentences).
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        out = None
        for chunk in order.split(NO_GRAD_CHUNK):
            width = int(lengths[chunk].max())
            features = self._encode(ids[chunk, :width], types[chunk, :width], mask[chunk, :width])
            if out is None:
                out = features.new_empty((len(ids), *features.shape[1:]))
            out[chunk] = features
        return out

    def _encode(self, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = self.transformer.get_input_embeddings().weight.dtype
        # An explicit 4-D additive mask: transformers then skips its own mask building, whose shortcuts branch on
        # the mask's values (which torch.func cannot batch).
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        arguments = {"input_ids": ids, "attention_mask": additive}
        if self.token_types:
            arguments["token_type_ids"] = types
        return self.transformer(**arguments).last_hidden_state[:, 0]


# -- the multi-task model -------------------------------------------------------------------------------
def _initializer_range(encoder: TextEncoder) -> float:
    return float(getattr(encoder.transformer.config, "initializer_range", 0.02) or 0.02)


class GLUEModel(MultiTaskModel):
    """The text encoder and a linear head per task; heads initialised as Hugging Face's classifiers (normal with the
    encoder's `initializer_range`, zero bias)."""

    def initialize(self, module: nn.Module) -> None:
        std = _initializer_range(self.encoder)
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                nn.init.normal_(sub.weight, mean=0.0, std=std)
                if isinstance(sub, nn.Linear) and sub.bias is not None:
                    nn.init.zeros_(sub.bias)
                if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                    with torch.no_grad():
                        sub.weight[sub.padding_idx].zero_()
            elif isinstance(sub, nn.LayerNorm):
                nn.init.ones_(sub.weight)
                nn.init.zeros_(sub.bias)

    def last_shared_layer(self) -> list[nn.Parameter]:
        """GradNorm's W: the encoder's last linear layer (the last block's output projection)."""
        linear = [m for m in self.encoder.modules() if isinstance(m, nn.Linear)]
        return [p for p in linear[-1].parameters() if p.requires_grad]

    def describe(self, device: torch.device) -> dict:
        config = self.encoder.transformer.config
        return {"encoder": self.encoder.name, "architecture": type(self.encoder.transformer).__name__,
                "attention": str(getattr(config, "_attn_implementation", "")), "max_length": self.encoder.max_length,
                "encoder_parameters": sum(p.numel() for p in self.encoder.parameters())}


def glue_model(tasks: list[str], encoder: TextEncoder, pretrained: bool = True) -> GLUEModel:
    """A linear head per task (one output for STS-B, one per class otherwise) on `encoder`."""
    return GLUEModel(encoder, {t: nn.Linear(encoder.out_features, num_outputs(t)) for t in tasks},
                     pretrained_encoder=pretrained)


def transformer(tasks: list[str], *, encoder: str = DEFAULT_ENCODER, max_length: int = 128,
                root: str | Path | None = None) -> GLUEModel:
    """A pretrained Hugging Face encoder (`encoder`: local folder, folder under the data root `root`, or hub name) and
    its tokenizer, inputs truncated to `max_length` tokens, a linear head per task on the first token. `root` is the
    run's data root (not a model option: the setting passes it)."""
    source, local = resolve_encoder(encoder, root)
    text_encoder = TextEncoder(load_transformer(source, local), load_tokenizer(source, local), max_length, encoder)
    return glue_model(tasks, text_encoder)
