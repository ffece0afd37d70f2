"""Training: the run config (a value), update rules, the trainer, grids of runs and the run dataset."""
from mtlcore.training.config import ConfigError, RunConfig, load_yaml
from mtlcore.training.results import combine_runs, load_run, save_atomic
from mtlcore.training.runner import base_config, diverged_runs, ensure_runs, grid, load_runs
from mtlcore.training.trainer import Trainer, run, run_path

__all__ = ["ConfigError", "RunConfig", "Trainer", "base_config", "combine_runs", "diverged_runs", "ensure_runs",
           "grid", "load_run", "load_runs", "load_yaml", "run", "run_path", "save_atomic"]
