"""Data settings: one module per setting, found through a configurable data root."""
from __future__ import annotations

from pathlib import Path

from mtlcore.data import fashion
from mtlcore.data.base import Setting, Split, TaskData
from mtlcore.data.locate import ENV_VAR, DataNotFoundError, data_root

# name -> (module with TASKS, DEFAULTS and load(tasks, **options, root=...))
SETTINGS = {"fashion_mtl": fashion}


def setting_module(name: str):
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; valid settings: {sorted(SETTINGS)}")
    return SETTINGS[name]


def load_setting(name: str, tasks: list[str], options: dict | None = None,
                 root: str | Path | None = None, download: bool = True) -> Setting:
    """Load `tasks` of setting `name` with the setting's `options` (sizes, data_seed)."""
    module = setting_module(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(module.DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for setting {name!r}; valid options: {sorted(module.DEFAULTS)}")
    return module.load(list(tasks), **{**module.DEFAULTS, **options}, root=root, download=download)


__all__ = ["SETTINGS", "Setting", "Split", "TaskData", "DataNotFoundError", "ENV_VAR", "data_root",
           "load_setting", "setting_module"]
