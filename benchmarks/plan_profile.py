"""How many runs a profile's paper-A chapters ask for, and how much training that is (to size a cluster).

    python benchmarks/plan_profile.py --profile paper

Counts the distinct runs (content hashes: chapters share runs) of §3, §4.1 and §4.2, FashionMTL and the other
settings, from the profile's parameters with the library's own grids, and the training they amount to in epochs and
examples seen. A validation selection's chosen point is not known before it trains; its first grid point stands in
(the count does not depend on it, the cost a little through the batch size).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from mtlcore import settings
from mtlcore.analysis.studies import Study
from mtlcore.book import profile_parameters
from mtlcore.training.runner import base_config, grid
from mtlcore.training.selection import grid_points


def selection_configs(base: dict, spec: dict, task_sets: list) -> list:
    if not spec:
        return []
    return [c for point in grid_points(spec["grid"]) for c in
            grid({**base, **point, "metrics": {}}, tasks=spec.get("task_sets") or task_sets, seed=spec.get("seeds", [0]))]


def chosen(spec: dict) -> dict:
    return grid_points(spec["grid"])[0] if spec else {}


def chapter_runs(name: str, p: dict) -> dict[str, list]:
    """part of the chapter -> its run configs."""
    base = base_config(p)
    target, partners = p["target"], p["partners"]
    pairs = [[target, q] for q in partners]
    out = defaultdict(list)
    if name == "sec4_2_smtos":
        out["FashionMTL selection"] = selection_configs(base, p.get("selection"), pairs)
        out["FashionMTL"] = grid({**base, **chosen(p.get("selection"))}, tasks=pairs,
                                 aggregator=["uniform", *p.get("aggregators", [])], seed=p["seeds"])
    else:
        task_sets = [[target]] + pairs
        out["FashionMTL selection"] = selection_configs(base, p.get("selection"), task_sets)
        out["FashionMTL"] = grid({**base, **chosen(p.get("selection"))}, tasks=task_sets, seed=p["seeds"])
    for spec in p.get("studies", []):
        study = Study.from_dict(spec)
        if study.setting not in settings.available():
            continue
        out[f"{study.display_name} selection"] = selection_configs(study.config, study.selection, study.task_sets())
        if name == "sec4_2_smtos":
            out[study.display_name] = grid({**study.config, **chosen(study.selection)}, tasks=[list(study.tasks)],
                                           aggregator=["uniform", *(p.get("aggregators", []) if study.aggregators is None
                                                                    else study.aggregators)],
                                           seed=list(study.seeds))
        else:
            out[study.display_name] = study.configs(chosen(study.selection))
    return out


def examples(config) -> int:
    """Training examples a run puts through its model: epochs x steps x batch x (tasks, multi-input settings)."""
    setting = settings.get(config.setting)
    options = setting.resolve_options(config.setting_options)
    steps = -(-setting.train_size(options) // config.batch_size)
    per_step = config.batch_size * (1 if setting.regime == "single_input" else len(config.tasks))
    return config.epochs * steps * per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    args = parser.parse_args()
    seen: dict[str, object] = {}
    print("| chapter | part | runs | new runs | with factors | epochs | examples (millions) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, p in profile_parameters(args.profile).items():
        if "target" not in p or "partners" not in p:
            print(f"| {name} | (not counted by this script) | | | | | |")
            continue
        for part, configs in chapter_runs(name, p).items():
            if not configs:
                continue
            new = {c.content_hash(): c for c in configs if c.content_hash() not in seen}
            seen.update(new)
            factors = sum(bool(c.metrics.get("factors")) for c in new.values())
            print(f"| {name} | {part} | {len(configs)} | {len(new)} | {factors} | "
                  f"{sum(c.epochs for c in new.values()):,} | {sum(examples(c) for c in new.values()) / 1e6:,.0f} |")
    factors = sum(bool(c.metrics.get("factors")) for c in seen.values())
    print(f"| **all** | | | **{len(seen)}** | {factors} | {sum(c.epochs for c in seen.values()):,} | "
          f"{sum(examples(c) for c in seen.values()) / 1e6:,.0f} |")


if __name__ == "__main__":
    main()
