"""Try one §3 configuration: Fashion1 STL and MTL with each partner over seeds, without factor measurements,
and print the transfer table (paper A, §3 and Appendix B). Used to choose the quick profile (benchmarks/README.md).

    python benchmarks/transfer_search.py NAME '{"optimizer": "adam", "lr": 0.001, ...}' [--partners fashion2,noisy_fashion]
    python benchmarks/transfer_search.py dropout0 '{"model_options": {"dropout": 0.0}}'

The JSON holds run-config keys (`mtlcore.training.RunConfig`) over the quick profile's: the model's options, dropout
among them, go in `model_options`, the model itself (`lenet_fused`, `lenet`) in `model`. Runs are cached under
benchmarks/out/transfer/NAME.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mtlcore import settings
from mtlcore.analysis import comparisons
from mtlcore.book import profile_parameters
from mtlcore.training import base_config, grid, load_runs

OUT = Path(__file__).resolve().parent / "out" / "transfer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="run-config keys as JSON, over the quick profile's")
    parser.add_argument("--partners", default="fashion2,noisy_fashion")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    quick = profile_parameters("quick")["sec3_transfer"]
    base = {**base_config(quick), "metrics": {}, **json.loads(args.overrides)}
    target = quick["target"]
    task_sets = [[target]] + [[target, p] for p in args.partners.split(",")]
    configs = grid(base, tasks=task_sets, seed=[int(s) for s in args.seeds.split(",")])
    start = time.perf_counter()
    display_names = settings.get(base["setting"]).display_names
    runs = comparisons.label_configurations(load_runs(configs, OUT / args.name, data_root=args.data_root), target,
                                            display_names)
    runs = runs.sel(task=target)
    summary = comparisons.generalization(runs["val_score"], runs["test_score"], k=10)
    print(f"{args.name}: {json.dumps(base, sort_keys=True)}")
    print(comparisons.transfer_table(summary, runs["configuration"]).round(4).to_string())
    for label, value in zip(runs["configuration"].values, summary.values):
        print(f"  {label}: {value:.4f}")
    gaps = comparisons.gaps_at_loss(runs["train_loss"], runs["test_score"], runs["configuration"], n_levels=6)
    gaps["delta"] = [f"{d:+.4f}" + (" *" if s else "") for d, s in zip(gaps["delta"], gaps["significant"])]
    print("Δ test accuracy against STL at common training losses (* significant):")
    print(gaps.pivot_table(index=["loss_level", "x_final"], columns="configuration", values="delta", aggfunc="first")
          .sort_index(ascending=False).to_string())
    print(f"{len(configs)} runs, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
