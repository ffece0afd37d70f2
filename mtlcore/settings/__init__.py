"""The settings: one folder each, registered here by name.

`get(name)` returns the setting (no data loaded); `available()` lists the names; `register(cls)` adds one
(a setting defined outside the package, e.g. in a notebook or a test). See `base.Setting` for the protocol.
"""
from __future__ import annotations

import importlib

from mtlcore.settings.base import (
    Examples,
    Loss,
    MultiTaskModel,
    Score,
    Setting,
    SettingData,
    Task,
    single_input_data,
)
from mtlcore.settings.locate import ENV_VAR, DataNotFoundError, data_root

# name -> "module:class"; imported on first use, so a setting's dependencies load only when it is used
_REGISTRY: dict[str, str | type[Setting]] = {
    "fashion_mtl": "mtlcore.settings.fashion_mtl:FashionMTL",
    "fashion_pool": "mtlcore.settings.fashion_pool:FashionPool",
    "cifar100": "mtlcore.settings.cifar100:CIFAR100",
    "celeba": "mtlcore.settings.celeba:CelebA",
    "glue": "mtlcore.settings.glue:GLUE",
    "cityscapes": "mtlcore.settings.cityscapes:Cityscapes",
    "multi_fashion": "mtlcore.settings.multi_fashion:MultiFashion",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Setting:
    """The setting `name`; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown setting {name!r}; valid settings: {available()}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), cls)
    return entry()


def register(cls: type[Setting]) -> type[Setting]:
    """Add a setting class under `cls.name` (usable as a decorator); a name already taken is refused."""
    if not (isinstance(cls, type) and issubclass(cls, Setting)):
        raise TypeError(f"register takes a Setting subclass, got {cls!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a setting named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


__all__ = ["ENV_VAR", "DataNotFoundError", "Examples", "Loss", "MultiTaskModel", "Score", "Setting", "SettingData",
           "Task", "available", "data_root", "get", "register", "single_input_data", "unregister"]
