"""The setting protocol: what the trainer, the trajectory factors and the analysis know about a setting.

A setting names its tasks, loads their data as `Examples` (inputs and targets indexable along their first
dimension: a tensor, or a mapping of tensors such as `input_ids`/`attention_mask`), declares its data regime,
builds its models, and gives each task a `Loss` and its `Score`s (the first one primary, each with its
direction). Everything else in mtlcore works through this file.

Regimes: "multi_input" settings give each task its own examples and a step draws one batch per task (the
batches go through the encoder together); "single_input" settings give every task the same examples with
one target per task, and a step draws one batch that carries every task's target.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

REGIMES = ("multi_input", "single_input")


# -- batches of any type -------------------------------------------------------------------------------
def take(data: Any, index: torch.Tensor | slice) -> Any:
    """The examples at `index` (first dimension) of a tensor or of every tensor in a mapping or sequence."""
    return tree_map(lambda t: t[index], data)


def to_device(data: Any, device: torch.device | str) -> Any:
    return tree_map(lambda t: t.to(device), data)


def count(data: Any) -> int:
    """How many examples a batch holds (the first dimension of its first tensor)."""
    leaves = tree_flatten(data)[0]
    if not leaves:
        raise ValueError("a batch holds no tensor")
    return len(leaves[0])


def concatenate(parts: Sequence[Any]) -> Any:
    """Batches of the same structure joined along the first dimension."""
    leaves = [tree_flatten(p) for p in parts]
    spec = leaves[0][1]
    joined = [torch.cat(group) for group in zip(*(flat for flat, _ in leaves))]
    return tree_unflatten(joined, spec)


@dataclass
class Examples:
    """One split of one task: inputs and targets with one entry per example along their first dimension."""

    inputs: Any
    targets: Any

    def __post_init__(self):
        if count(self.inputs) != count(self.targets):
            raise ValueError(f"{count(self.inputs)} inputs but {count(self.targets)} targets; give one target per input")

    def __len__(self) -> int:
        return count(self.targets)

    def take(self, index: torch.Tensor | slice) -> tuple[Any, Any]:
        return take(self.inputs, index), take(self.targets, index)

    def first(self, n: int) -> "Examples":
        return Examples(take(self.inputs, slice(0, n)), take(self.targets, slice(0, n)))

    def to(self, device: torch.device | str) -> "Examples":
        return Examples(to_device(self.inputs, device), to_device(self.targets, device))


# -- losses and scores ---------------------------------------------------------------------------------
class Loss:
    """A task's training loss. `__call__` gives one loss per example (shape N); `mean` the batch's loss;
    `sample` draws targets from the model's predictive distribution p_θ(·|x) (the true Fisher, Eq. 5), and
    `fisher_scale` turns squared gradients of this loss into those of −log p_θ (1 where the loss is −log p_θ)."""

    fisher_scale: float = 1.0

    def __call__(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return self(outputs, targets).mean()

    def sample(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no predictive distribution to sample the Fisher from")

    def sample_like(self, outputs: torch.Tensor, targets: Any, generator: torch.Generator | None = None) -> Any:
        """`sample`, knowing the true targets of the same examples: for a likelihood over part of an output only (the
        labelled pixels of a segmentation), the draw leaves out what the targets leave out. By default the targets
        change nothing."""
        return self.sample(outputs, generator=generator)


@dataclass(frozen=True)
class Score:
    """A score of a task over a whole split: `statistics(outputs, targets)` of each batch are summed, and
    `value(total)` gives the score (so a confusion matrix or a count of correct predictions accumulates
    over the split instead of being averaged per batch)."""

    name: str
    higher_is_better: bool
    statistics: Callable[[torch.Tensor, Any], torch.Tensor]
    value: Callable[[torch.Tensor], float]
    percent: bool = False  # a rate in [0, 1] that tables show in percentage points (as papers write accuracy)


@dataclass(frozen=True)
class Task:
    """What the trainer and the factors need of one task."""

    name: str
    loss: Loss
    scores: tuple[Score, ...]  # the first is the primary score

    @property
    def primary(self) -> Score:
        return self.scores[0]


# -- the model -----------------------------------------------------------------------------------------
class MultiTaskModel(nn.Module):
    """`encoder(inputs) -> features` is shared; `heads[task](features)` gives that task's output.

    Features are batch-first (one row, map or token sequence per example), so a joint batch of several tasks
    can be split after the encoder. `pretrained_encoder`: the encoder's weights come from a file and are
    kept when the trainer seeds the initialisation (the heads are always re-initialised). `memory_format`: the
    layout the trainer puts the parameters in (a subclass may choose channels-last for convolutions).
    """

    memory_format: ClassVar[torch.memory_format] = torch.preserve_format

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], pretrained_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.pretrained_encoder = pretrained_encoder

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, inputs: Any, task: str) -> torch.Tensor:
        return self.heads[task](self.encoder(inputs))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for p in self.heads[task].parameters() if p.requires_grad]

    def initialize(self, module: nn.Module) -> None:
        """(Re)initialise `module`, the encoder or a head, drawing from torch's global generator (the trainer seeds
        it per module): every submodule's `reset_parameters`, PyTorch's defaults. A model whose architecture has its
        own initialisation (ResNet's) overrides this."""
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()

    @property
    def couples_examples(self) -> bool:
        """Whether the encoder's output for one example depends on the other examples of its batch (batch
        statistics: BatchNorm in training mode). A model with another layer that mixes examples overrides this."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.encoder.modules())

    def describe(self, device: torch.device) -> dict:
        """What a run on `device` records about how the model computes (`model_info`): nothing by default."""
        return {}

    def last_shared_layer(self) -> list[nn.Parameter]:
        """Parameters of the encoder's last parametrised module (GradNorm's W)."""
        modules = [m for m in self.encoder.modules() if any(True for _ in m.parameters(recurse=False))]
        return [p for p in modules[-1].parameters(recurse=False) if p.requires_grad]


DATA_ROOT_PARAMETER = "root"  # a builder's keyword for the run's data root (a pretrained encoder's folder): no option


def options_of(builder: Callable) -> dict[str, Any]:
    """A model builder's options and their defaults (its keyword-only parameters but `root`, which `build_model`
    fills with the run's data root)."""
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name != DATA_ROOT_PARAMETER}


# -- loaded data ---------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


@dataclass
class SettingData:
    """The loaded splits of a run's tasks. `examples[split][task]`: the task's examples (in a single-input
    setting every task's share one set of inputs); `joint[split]`: single-input settings only, the shared
    inputs with a mapping task → targets. `info`: provenance recorded with every run (sizes, files, MD5s)."""

    tasks: list[str]
    examples: dict[str, dict[str, Examples]]
    joint: dict[str, Examples] | None = None
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "SettingData":
        examples = {s: {t: e.to(device) for t, e in by_task.items()} for s, by_task in self.examples.items()}
        joint = None if self.joint is None else {s: e.to(device) for s, e in self.joint.items()}
        return SettingData(self.tasks, examples, joint, self.info)


def single_input_data(tasks: Sequence[str], splits: Mapping[str, Examples], info: dict) -> SettingData:
    """SettingData of a single-input setting from its splits (inputs, mapping task → targets)."""
    examples = {s: {t: Examples(e.inputs, e.targets[t]) for t in tasks} for s, e in splits.items()}
    joint = {s: Examples(e.inputs, {t: e.targets[t] for t in tasks}) for s, e in splits.items()}
    return SettingData(list(tasks), examples, joint, info)


# -- the setting ---------------------------------------------------------------------------------------
class Setting:
    """Base of every setting; a subclass sets the class attributes and writes `load`, `task` and its model
    builders (keyword-only options with defaults, so that `model_options` are validated and hashed).

    `defaults` are the setting's options (`setting_options` of a run config) with their default values;
    integer options ending in `_size` must be positive, other integers non-negative.
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    display_names: ClassVar[dict[str, str]] = {}
    regime: ClassVar[str] = "multi_input"
    defaults: ClassVar[dict[str, Any]] = {}
    models: ClassVar[dict[str, Callable[..., MultiTaskModel]]] = {}
    default_model: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "regime", None) not in REGIMES:
            raise TypeError(f"{cls.__name__}.regime={cls.regime!r}; use one of {list(REGIMES)}")

    # options ---------------------------------------------------------------------------------------
    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The options with the defaults filled in; unknown or badly typed ones raise ValueError."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown setting option(s) {unknown} for {self.name!r}; valid options (defaults): "
                             f"{self.defaults}")
        for key, value in options.items():
            default = self.defaults[key]
            if type(default) is bool and not isinstance(value, bool):
                raise ValueError(f"setting option {key}={value!r} must be true or false")
            if type(default) is int:
                minimum = 1 if key.endswith("_size") else 0
                if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                    raise ValueError(f"setting option {key}={value!r} must be an integer >= {minimum}")
            elif type(default) is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                 and math.isfinite(value)):
                raise ValueError(f"setting option {key}={value!r} must be a finite number")
        self.validate_options({**self.defaults, **options})
        return {**self.defaults, **options}

    def validate_options(self, options: dict[str, Any]) -> None:
        """Checks across options (a subclass refuses combinations it cannot load)."""

    def check_tasks(self, tasks: Sequence[str]) -> list[str]:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("`tasks` is empty; give at least one task")
        bad = [t for t in tasks if t not in self.tasks]
        if bad:
            raise ValueError(f"unknown task(s) {bad} for setting {self.name!r}; valid tasks: {list(self.tasks)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"`tasks` repeats a task: {tasks}")
        return tasks

    def train_size(self, options: Mapping[str, Any]) -> int:
        """Training examples of the setting's largest task under `options`: one epoch is this many examples,
        whichever tasks a run trains, so that STL and MTL runs take the same number of steps."""
        return int(options["train_size"])

    # models ----------------------------------------------------------------------------------------
    def resolve_model(self, name: str | None, options: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """The model's name (the setting's default for None) and its options with defaults filled in."""
        name = self.default_model if name is None else name
        if name not in self.models:
            raise ValueError(f"unknown model {name!r} for setting {self.name!r}; valid models: {sorted(self.models)}")
        defaults = options_of(self.models[name])
        options = dict(options or {})
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise ValueError(f"model {name!r}: unknown option(s) {unknown}; valid options (defaults): {defaults}")
        options = {**defaults, **options}
        self.validate_model_options(name, options)
        return name, options

    def validate_model_options(self, name: str, options: dict[str, Any]) -> None:
        """Refuse bad option values before any run starts (a builder runs only when training starts, and may
        load weights)."""

    def build_model(self, name: str | None, tasks: Sequence[str], options: Mapping[str, Any] | None = None,
                    root: str | Path | None = None) -> MultiTaskModel:
        """The model `name` for `tasks`; `root`, the run's data root, goes to a builder that takes a `root` keyword
        (models that read files under it, e.g. a pretrained encoder's folder)."""
        name, options = self.resolve_model(name, options)
        builder = self.models[name]
        if DATA_ROOT_PARAMETER in inspect.signature(builder).parameters:
            options[DATA_ROOT_PARAMETER] = root
        return builder(list(tasks), **options)

    # data and tasks --------------------------------------------------------------------------------
    def load(self, tasks: Sequence[str], options: Mapping[str, Any], root: str | Path | None = None,
             download: bool = True) -> SettingData:
        """Load `tasks` with the (resolved) `options` from the data root."""
        raise NotImplementedError

    def task(self, name: str) -> Task:
        """The loss and scores of task `name`."""
        raise NotImplementedError

    def augmentation(self, options: Mapping[str, Any]) -> Callable[[Any, torch.Generator], Any] | None:
        """The transform of training batches under the (resolved) `options`, `f(inputs, generator) -> inputs`, or None
        for none (the default). The trainer applies it once per step to each task's drawn batch, drawing only from
        the generator it passes (seeded by the run's seed, checkpointed with the run), so runs stay reproducible."""
        return None

    def join_inputs(self, inputs: Sequence[Any]) -> Any:
        """Several tasks' input batches as one encoder batch (multi-input regime): concatenated. A setting whose
        batches differ in shape (text padded per batch, say) pads them here."""
        return concatenate(inputs)

    def missing_optional_files(self, root: Path) -> list[str]:
        """Files that `mtlcore data` should mention: needed only by some options."""
        return []

    def write_fixture(self, root: Path, seed: int = 0) -> None:
        """Write small files in exactly the released layout under the data root `root`, for machines without the
        real data: the real loader reads them, so a run on them proves the pipeline (and says nothing about the
        data set). Settings whose data is available offline write none."""
        raise NotImplementedError(f"the {self.display_name} setting writes no fixture files")
