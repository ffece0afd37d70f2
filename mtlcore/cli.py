"""`mtlcore run | batch | sweep | data`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _run(args) -> int:
    from mtlcore.training import RunConfig, run, run_path

    config = RunConfig.from_yaml(args.config)
    ds = run(config, data_root=args.data_root, results_dir=args.results_dir)
    path = run_path(config, args.results_dir)
    print(f"{ds.attrs['status']}: {path}")
    return 0 if ds.attrs["status"] == "complete" else 3


def _batch(args) -> int:
    from mtlcore.book import run_batch

    paths = run_batch(args.profile, notebooks=args.notebook, data_root=args.data_root,
                      executor=_executor(args), cached_only=args.cached_only)
    for path in paths:
        print(f"executed: {path}")
    return 0


def _executor(args) -> str | None:
    if args.dask and args.executor:
        raise ValueError("give --executor or --dask (its older spelling), not both")
    if args.dask:  # `--dask local`: a local cluster; else a scheduler address
        return "dask" if args.dask == "local" else args.dask
    return args.executor


def _sweep(args) -> int:
    """A grid file: `base:` a run config, `grid:` key -> list of values (every combination is run)."""
    from mtlcore.training import ensure_runs, grid, load_yaml
    from mtlcore.training.runner import RunsFailed

    spec = load_yaml(args.grid)
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k, {}), dict) for k in ("base", "grid")):
        raise ValueError(f"sweep file {args.grid}: expected `base:` (a run config) and `grid:` (key -> list of values)")
    unknown = sorted(set(spec) - {"base", "grid"})
    if unknown:
        raise ValueError(f"sweep file {args.grid}: unknown top-level key(s) {unknown}; valid: ['base', 'grid']")
    configs = grid(spec.get("base", {}), **spec.get("grid", {}))
    try:
        paths = ensure_runs(configs, args.results_dir, data_root=args.data_root, executor=_executor(args),
                            retry_failed=args.retry_failed, claim_timeout=args.claim_timeout)
    except RunsFailed as error:  # the other runs are saved; the message lists the failed ones
        print(f"mtlcore sweep: error: {error}", file=sys.stderr)
        return 1
    print(f"{len(paths)} runs under {Path(args.results_dir) / 'runs'}")
    return 0


def _check_book(args) -> int:
    import os

    from mtlcore.book import PROJECT_ROOT, check_rendered
    from mtlcore.settings import data_root

    forbidden = [str(PROJECT_ROOT), str(Path.home()), str(data_root(args.data_root)),
                 os.environ.get("MTLCORE_DATA_DIR", "")]
    problems = check_rendered(Path(args.html_dir), [p for p in forbidden if len(p) > 1])
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{args.html_dir}: {len(problems)} problem(s)")
    return 1 if problems else 0


def _job_script(args) -> int:
    from mtlcore.training.executor import job_script

    print(job_script(args.executor))
    return 0


def _data(args) -> int:
    from mtlcore import settings

    if args.list or args.setting is None:
        for name in settings.available():
            setting = settings.get(name)
            print(f"{name}: {setting.display_name}, tasks {', '.join(setting.tasks)}")
        return 0 if args.list else 2
    setting = settings.get(args.setting)
    tiny = {key: 1 for key in ("train_size", "val_size", "test_size") if key in setting.defaults}  # every file, 1 example
    setting.load(setting.tasks, tiny, root=args.data_root)
    root = settings.data_root(args.data_root)
    missing = setting.missing_optional_files(root)
    print(f"{args.setting}: the required files are present under {root}")
    for line in missing:
        print(f"  missing (optional): {line}")
    return 0


def _executor_options(p) -> None:
    p.add_argument("--executor", default=None, metavar="SPEC",
                   help="where runs train: sequential (default, or $MTLCORE_EXECUTOR), processes:N (N local worker "
                        "processes), tcp://HOST:PORT (a Dask scheduler), slurm:FILE or pbs:FILE (dask-jobqueue)")
    p.add_argument("--dask", default=None, help=argparse.SUPPRESS)  # older spelling: 'local' or an address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtlcore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train one run from a YAML config")
    p.add_argument("config")
    p.add_argument("--results-dir", default="results/adhoc")
    p.add_argument("--data-root", default=None, help="data folder (default: $MTLCORE_DATA_DIR or the user cache)")
    p.set_defaults(func=_run)
    p = sub.add_parser("batch", help="execute the section notebooks of a profile into book/")
    p.add_argument("--profile", default="quick")
    p.add_argument("--notebook", action="append", help="only these notebooks (repeatable)")
    p.add_argument("--data-root", default=None)
    _executor_options(p)
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: build from runs precomputed into the results folder, failing on a missing one")
    p.set_defaults(func=_batch)
    p = sub.add_parser("sweep", help="run a grid of configs, locally or on Dask")
    p.add_argument("grid", help="YAML with `base:` (a run config) and `grid:` (key -> list of values)")
    p.add_argument("--results-dir", default="results/sweep")
    p.add_argument("--data-root", default=None)
    _executor_options(p)
    p.add_argument("--retry-failed", action="store_true",
                   help="train again the runs an earlier sweep recorded as failed (<run>.failed.json)")
    p.add_argument("--claim-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="take over a run another process claimed but has not refreshed for this long (default 600)")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("check-book", help="check a rendered book: no machine path, captioned figures, every claim")
    p.add_argument("html_dir", nargs="?", default="book/_build/html")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=_check_book)
    p = sub.add_parser("job-script", help="print the batch job a slurm:/pbs: executor submits for each worker")
    p.add_argument("executor", help="slurm:FILE or pbs:FILE (a YAML file of cluster settings)")
    p.set_defaults(func=_job_script)
    p = sub.add_parser("data", help="check (and download when online) a setting's data files")
    p.add_argument("setting", help="a setting name (`mtlcore data --list` lists them)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the settings")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=_data)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message says what and how to fix
        print(f"mtlcore {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = "; finished runs are saved, and the same command resumes an unfinished one from its last epoch " \
                  "checkpoint" if args.command in ("run", "sweep", "batch") else ""
        print(f"mtlcore {args.command}: interrupted{resumes}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
