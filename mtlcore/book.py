"""Papermill batch execution: every section notebook with a profile's parameters, saved into the book."""
from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
from pathlib import Path

from mtlcore.training.config import load_yaml

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The paper's order; the book's table of contents follows it.
NOTEBOOKS = ("sec3_transfer", "sec4_1_factors", "sec4_2_smtos")


def profiles(params_dir: Path = PROJECT_ROOT / "params") -> list[str]:
    return sorted(p.name for p in (params_dir / "profiles").iterdir() if p.is_dir())


def profile_parameters(profile: str, params_dir: Path = PROJECT_ROOT / "params") -> dict[str, dict]:
    """notebook name -> its parameters in `profile`: its own file, plus the profile's `studies.yaml` (the settings it
    runs besides FashionMTL) for the notebooks that declare a `studies` parameter."""
    folder = params_dir / "profiles" / profile
    if not folder.is_dir():
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {profiles(params_dir)}")
    studies = profile_studies(folder)
    out = {}
    for name in NOTEBOOKS:
        path = folder / f"{name}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"profile {profile!r} has no parameters for notebook {name!r}: create {path}")
        out[name] = load_yaml(path) or {}
        if "studies" in declared_parameters(name):
            out[name].setdefault("studies", studies)
    return out


def profile_studies(folder: Path) -> list[dict]:
    """The `studies:` list of a profile folder's studies.yaml (none when the file is absent), each checked."""
    from mtlcore.analysis.studies import Study

    path = folder / "studies.yaml"
    content = (load_yaml(path) or {}) if path.exists() else {}
    if not isinstance(content, dict) or set(content) - {"studies"}:
        raise ValueError(f"{path}: expected one key, `studies:` (a list of studies), got {sorted(content)}")
    studies = content.get("studies") or []
    for spec in studies:
        Study.from_dict(spec)  # a bad study fails here, before any notebook runs
    return studies


def declared_parameters(notebook: str) -> set[str]:
    """The names the notebook's `parameters` cell assigns."""
    import ast

    import jupytext

    source = jupytext.read(PROJECT_ROOT / "notebooks" / f"{notebook}.py")
    for cell in source.cells:
        if "parameters" in cell.metadata.get("tags", []):
            return {target.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
    return set()


def git_commit(root: Path = PROJECT_ROOT) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def run_batch(profile: str, *, notebooks: list[str] | None = None, data_root: str | None = None,
              results_root: Path = PROJECT_ROOT / "results", book_dir: Path = PROJECT_ROOT / "book",
              progress: bool = True) -> list[Path]:
    """Execute the notebooks of `profile` with papermill into `book_dir`; return the executed paths.

    A notebook that raises stops the batch with papermill's error (naming the failing cell); runs that
    finished before stay on disk, so the next batch resumes there.
    """
    import jupytext
    import papermill

    from mtlcore.settings import data_root as resolve_data_root

    parameters = profile_parameters(profile)
    chosen = notebooks or list(NOTEBOOKS)
    unknown = [n for n in chosen if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; valid notebooks: {list(NOTEBOOKS)}")
    results_dir = (results_root / profile).resolve()
    root = str(resolve_data_root(data_root))
    write_run_info(profile, parameters, root, book_dir)
    executed = []
    for name in chosen:
        source = PROJECT_ROOT / "notebooks" / f"{name}.py"
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        output = book_dir / f"{name}.ipynb"
        params = {**parameters[name], "profile": profile, "results_dir": str(results_dir), "data_root": root}
        log.info("executing %s (profile %s) -> %s", source.name, profile, output)
        papermill.execute_notebook(notebook, str(output), parameters=params, kernel_name="python3",
                                   cwd=str(PROJECT_ROOT / "notebooks"), progress_bar=progress)
        executed.append(output)
    return executed


def missing_chapters(book_dir: Path = PROJECT_ROOT / "book") -> list[str]:
    """What `mtlcore batch` writes into the book folder and is not there: the executed notebooks and the intro's
    provenance block."""
    wanted = [f"{name}.ipynb" for name in NOTEBOOKS] + ["_generated/run_info.md"]
    return [name for name in wanted if not (Path(book_dir) / name).is_file()]


def setup(app):
    """A Sphinx extension (book/_config.yml lists it): `jupyter-book build book` on notebooks that were never
    executed stops here, saying what to run, instead of failing on a missing table-of-contents entry."""
    from sphinx.errors import ConfigError as SphinxConfigError

    def check(app, config):
        missing = missing_chapters(Path(app.srcdir))
        if missing:
            raise SphinxConfigError(
                f"the book has not been executed yet (missing in {app.srcdir}: {', '.join(missing)}). Run "
                "`mtlcore batch --profile quick` (or `make book`, which also renders it) first: it executes the "
                "section notebooks into book/.")

    app.connect("config-inited", check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def write_run_info(profile: str, parameters: dict[str, dict], data_root: str, book_dir: Path) -> Path:
    """The provenance block the book's first page includes: profile, sizes, seeds, commit."""
    import torch

    from mtlcore import __version__

    lines = [
        f"- **Profile:** `{profile}`",
        f"- **Commit:** `{git_commit()}`",
        f"- **Built:** {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with mtlcore {__version__}, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        f"- **Data root:** `{data_root}`",
        "",
        "| notebook | setting | data per task (train / val / test) | seeds | epochs | optimizer | lr | batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in parameters.items():
        sizes = p.get("setting_options", {})
        grid = (p.get("selection") or {}).get("grid", {})
        cells = [f"{p.get(k, '?')}" if k not in grid else f"chosen on validation from {grid[k]}"
                 for k in ("optimizer", "lr", "batch_size")]
        lines.append(
            f"| {name} | {p.get('setting', '?')} | {sizes.get('train_size', '?')} / {sizes.get('val_size', '?')} / "
            f"{sizes.get('test_size', '?')} | {', '.join(map(str, p.get('seeds', [])))} | {p.get('epochs', '?')} | "
            + " | ".join(cells) + " |")
    studies = next((p["studies"] for p in parameters.values() if p.get("studies")), [])
    if studies:
        lines += ["", "Other settings (every task together against each target alone):", "",
                  "| setting | data | tasks (MTL) | targets (STL) | seeds | epochs | model | device |",
                  "|---|---|---|---|---|---|---|---|"]
        for study in studies:
            tasks = study.get("tasks")
            lines.append(f"| {study['setting']} | {study.get('data', 'root')} | {len(tasks) if tasks else 'all'} | "
                         f"{len(study.get('targets') or tasks or []) or 'all'} | "
                         f"{', '.join(map(str, study.get('seeds', [0, 1, 2])))} | {study.get('epochs', '?')} | "
                         f"{study.get('model', 'default')} | {study.get('device', 'auto')} |")
    lines += ["", "<details><summary>All parameters</summary>", "", "```json",
              json.dumps(parameters, indent=1, sort_keys=True), "```", "", "</details>", ""]
    path = book_dir / "_generated" / "run_info.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
