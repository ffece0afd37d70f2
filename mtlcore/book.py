"""Papermill batch execution: every section notebook with a profile's parameters, saved into the book."""
from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mtlcore.training.config import load_yaml

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The paper's order; the book's table of contents follows it.
NOTEBOOKS = ("sec3_transfer", "sec4_1_factors", "sec4_2_smtos", "sec5_conflict", "appendix_c", "paperb_uniform")


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
        declared = declared_parameters(name)
        if not isinstance(out[name], dict):
            raise ValueError(f"{path}: expected a mapping of parameter names to values")
        unknown = sorted(set(out[name]) - declared)
        if unknown:  # papermill would only warn, and the notebook would run with its default
            hints = {k: difflib.get_close_matches(k, declared, n=1) for k in unknown}
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
            raise ValueError(f"{path}: {hint} is not a parameter of notebook {name}; valid: {sorted(declared)}")
        if "studies" in declared:
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
              progress: bool = True, executor: str | None = None, cached_only: bool = False) -> list[Path]:
    """Execute the notebooks of `profile` with papermill into `book_dir`; return the executed paths.

    `executor` (see `mtlcore.training.executor`) is where the notebooks' runs train: a cluster is started once and
    every notebook's `load_runs` sends its runs there. `cached_only`: train nothing, and fail on a run that is not
    in the results folder (a book from runs precomputed elsewhere). Each notebook is written under a temporary name
    and moved into `book_dir` only once it finished, so an interrupted batch never leaves a notebook that reads as
    complete. A notebook that raises stops the batch with papermill's error (naming the failing cell); runs that
    finished before stay on disk, so the next batch resumes there.
    """
    import jupytext
    import papermill

    from mtlcore.settings import data_root as resolve_data_root
    from mtlcore.training.executor import ENV_VAR, Executor
    from mtlcore.training.results import temporary_name
    from mtlcore.training.runner import CACHED_ONLY_ENV, PROGRESS_ENV

    parameters = profile_parameters(profile)
    chosen = notebooks or list(NOTEBOOKS)
    unknown = [n for n in chosen if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; valid notebooks: {list(NOTEBOOKS)}")
    spec = Executor.parse(executor)
    results_dir = (results_root / profile).resolve()
    root = str(resolve_data_root(data_root))
    write_run_info(profile, parameters, root, book_dir)
    environment = {CACHED_ONLY_ENV: "1" if cached_only else "",
                   ENV_VAR: spec.client().scheduler.address if spec.distributed else "sequential"}
    executed = []
    with _environment(environment):
        for name in chosen:
            source = PROJECT_ROOT / "notebooks" / f"{name}.py"
            notebook = jupytext.read(source)
            notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            output = book_dir / f"{name}.ipynb"
            partial = temporary_name(output).with_suffix(".ipynb")  # not an .ipynb the book would render as done
            params = {**parameters[name], "profile": profile, "results_dir": str(results_dir), "data_root": root}
            log.info("executing %s (profile %s, executor %s) -> %s", source.name, profile, spec, output)
            started = time.perf_counter()
            with _follow_runs(name, progress) as events:
                os.environ[PROGRESS_ENV] = str(events)
                try:
                    papermill.execute_notebook(notebook, str(partial), parameters=params, kernel_name="python3",
                                               cwd=str(PROJECT_ROOT / "notebooks"), progress_bar=False)
                    hide_machine_paths(partial, {str(results_dir): "<results folder>", root: "<data root>"})
                    os.replace(partial, output)
                finally:
                    partial.unlink(missing_ok=True)
            record_chapter(book_dir, name, profile, time.perf_counter() - started)
            executed.append(output)
    write_generated_pages(profile, results_dir, book_dir)
    return executed


def hide_machine_paths(notebook_path: Path, replacements: dict[str, str]) -> None:
    """In an executed notebook, the cell of parameters papermill injected: collapsed (`hide-cell`), with the building
    machine's folders shown as placeholders; and any output naming those folders gets the placeholders too."""
    content = json.loads(Path(notebook_path).read_text())
    ordered = sorted(replacements.items(), key=lambda item: -len(item[0]))  # the longest (most specific) first

    def clean(text: str) -> str:
        for path, placeholder in ordered:
            text = text.replace(path, placeholder)
        return text

    for cell in content["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
        cell["source"] = clean("".join(cell["source"]))
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = clean("".join(output["text"]))
            for kind, data in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(data, (str, list)):
                    output["data"][kind] = clean("".join(data))
    Path(notebook_path).write_text(json.dumps(content, indent=1, ensure_ascii=False))


def record_chapter(book_dir: Path, name: str, profile: str, seconds: float) -> None:
    """Keep when and how long each chapter ran (`_generated/chapters.json`), for the reproducibility page."""
    path = Path(book_dir) / "_generated" / "chapters.json"
    chapters = json.loads(path.read_text()) if path.is_file() else {}
    chapters[name] = {"profile": profile, "seconds": round(seconds, 1),
                      "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chapters, indent=1))


def write_generated_pages(profile: str, results_dir: Path, book_dir: Path) -> None:
    """The claims scoreboard (first page) and the reproducibility page's tables, from the chapters' datasets and
    run files under `results_dir`."""
    from mtlcore.analysis import claims

    folder = Path(book_dir) / "_generated"
    folder.mkdir(parents=True, exist_ok=True)
    board = claims.scoreboard(results_dir, NOTEBOOKS)
    (folder / "scoreboard.md").write_text(claims.scoreboard_markdown(board) + "\n")
    (folder / "provenance.md").write_text(provenance_markdown(profile, results_dir, book_dir))


def provenance_markdown(profile: str, results_dir: Path, book_dir: Path) -> str:
    """Profile, commit, versions, each chapter's runtime, the run files and the data files' digests: no machine path."""
    import numpy
    import torch
    import xarray as xr

    from mtlcore import __version__
    from mtlcore.training.config import RESULTS_VERSION
    from mtlcore.training.results import run_attrs

    chapters_path = Path(book_dir) / "_generated" / "chapters.json"
    chapters = json.loads(chapters_path.read_text()) if chapters_path.is_file() else {}
    runs = sorted((Path(results_dir) / "runs").glob("*.nc"))
    files, statuses, seconds = {}, {}, 0.0
    for path in runs:
        attrs = run_attrs(path)
        for name, digest in json.loads(attrs.get("data_files", "{}")).items():
            files.setdefault(name, set()).add(digest)
        statuses[attrs.get("status")] = statuses.get(attrs.get("status"), 0) + 1
        seconds += float(attrs.get("wall_seconds", 0.0))
    lines = [f"- **Profile:** `{profile}`; **commit:** `{git_commit()}`; **results version:** {RESULTS_VERSION}",
             f"- **Packages:** mtlcore {__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
             f"xarray {xr.__version__}, Python {sys.version.split()[0]}",
             f"- **Runs in the results folder:** {len(runs)} ("
             + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + f"), {seconds / 3600:.2f} hours of training "
             "as their files record", "", "| chapter | profile | ran for | finished |", "|---|---|---:|---|"]
    for name in NOTEBOOKS:
        c = chapters.get(name)
        lines.append(f"| {name} | {c['profile']} | {c['seconds'] / 60:.1f} min | {c['finished']} |" if c else
                     f"| {name} | not executed in this book | | |")
    lines += ["", "Data files the runs read (paths under the data root) and their SHA-256 (first 16 hex digits; "
              "several digests: runs read different versions of the file):", "", "| file | SHA-256 |", "|---|---|"]
    lines += [f"| `{name}` | {', '.join(f'`{d}`' for d in sorted(digests))} |" for name, digests in sorted(files.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for the notebooks' kernels (they inherit this process's environment)."""
    saved = {key: os.environ.get(key) for key in (*values, "MTLCORE_PROGRESS_FILE")}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _follow_runs(notebook: str, show: bool):
    """A progress bar of the runs a notebook asks for: its kernel appends the counts of every `ensure_runs` call to
    an events file (`mtlcore.training.runner.RunProgress`), which a thread of this process follows."""
    import tempfile
    import threading

    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="mtlcore-batch-") as folder:
        events = Path(folder) / "runs.jsonl"
        events.touch()
        done, calls = threading.Event(), []  # the latest counts of each `ensure_runs` call
        bar = tqdm(desc=notebook, unit="run", disable=not show, total=0)
        keys = ("cached", "trained", "running", "diverged", "failed")

        def totals() -> dict:
            return {k: sum(c[k] for c in calls) for k in ("total", *keys)}

        def follow():
            offset = 0
            while True:
                finished = done.is_set()
                with open(events) as handle:
                    handle.seek(offset)
                    lines = handle.readlines()
                    offset = handle.tell()
                for line in lines:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event["event"] == "start":
                        calls.append(event)
                    elif calls:
                        calls[-1] = event
                    t = totals()
                    bar.total, bar.n = t["total"], t["cached"] + t["trained"] + t["failed"]
                    label = f" | {event['label']}" if event.get("label") and event["running"] else ""
                    bar.set_postfix_str(", ".join(f"{k} {t[k]}" for k in keys if t[k]) + label)
                if finished:
                    return
                time.sleep(0.5)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield events
        finally:
            done.set()
            thread.join()
            bar.close()
            t = totals()
            if show and calls:
                print(f"{notebook}: {t['total']} runs: {t['cached']} on disk, {t['trained']} trained, "
                      f"{t['diverged']} diverged, {t['failed']} failed", file=sys.stderr)


def missing_chapters(book_dir: Path = PROJECT_ROOT / "book") -> list[str]:
    """The executed notebooks that are not in the book folder (what `mtlcore batch` writes there)."""
    return [f"{name}.ipynb" for name in NOTEBOOKS if not (Path(book_dir) / f"{name}.ipynb").is_file()]


PROFILE_ENV = "MTLCORE_PROFILE"


def setup(app):
    """A Sphinx extension (book/_config.yml lists it): `jupyter-book build book` executes, with the profile
    ``$MTLCORE_PROFILE`` (default `quick`), every chapter that `mtlcore batch` has not executed into the book folder,
    then renders them all as they are; it also writes the first page's scoreboard and the reproducibility page."""

    def execute_missing(app, config):
        book_dir = Path(app.srcdir)
        missing = [name.removesuffix(".ipynb") for name in missing_chapters(book_dir)]
        built = _built_profile(book_dir)
        profile = (os.environ.get(PROFILE_ENV) or built if missing else built or os.environ.get(PROFILE_ENV)) or "quick"
        if missing:
            log.warning("executing the chapters not executed yet (%s) with profile %r", ", ".join(missing), profile)
            run_batch(profile, notebooks=missing, book_dir=book_dir)  # also writes the generated pages
        else:
            if not (book_dir / "_generated" / "run_info.md").is_file():
                write_run_info(profile, profile_parameters(profile), "", book_dir)
            write_generated_pages(profile, (PROJECT_ROOT / "results" / profile).resolve(), book_dir)

    app.connect("config-inited", execute_missing)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def _built_profile(book_dir: Path) -> str | None:
    """The profile of the chapters already in the book (from `_generated/chapters.json`), if any."""
    path = Path(book_dir) / "_generated" / "chapters.json"
    if not path.is_file():
        return None
    profiles_seen = {c["profile"] for c in json.loads(path.read_text()).values()}
    return profiles_seen.pop() if len(profiles_seen) == 1 else None


def write_run_info(profile: str, parameters: dict[str, dict], data_root: str, book_dir: Path) -> Path:
    """The provenance block the book's first page includes: profile, sizes, seeds, commit."""
    import torch

    from mtlcore import __version__

    lines = [
        f"- **Profile:** `{profile}`",
        f"- **Commit:** `{git_commit()}`",
        f"- **Built:** {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with mtlcore {__version__}, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "- **Data root:** the folder given by `--data-root` or `$MTLCORE_DATA_DIR` (not shown: a path of the "
        "building machine); the files read and their digests are on the reproducibility page",
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


# A folder of a machine, as it would show in a page (not in a URL: no ':', '/' or word character before it).
MACHINE_PATH = re.compile(r"(?<![\w:/.%-])/(?:home|root|tmp|Users|mnt|work|private|var|opt|scratch|data)/[\w.-]+")


def check_rendered(html_dir: Path, forbidden: list[str] = ()) -> list[str]:
    """What a reader must not meet in the rendered book: a machine path (`MACHINE_PATH`, or one of `forbidden`), a
    chapter figure without its numbered caption, a claim missing from the first page's scoreboard. Returns the
    problems (empty: the book passes)."""
    import html as html_module

    from mtlcore.analysis.claims import CLAIMS

    html_dir = Path(html_dir)
    problems = []
    pages = sorted(html_dir.glob("*.html"))
    if not pages:
        return [f"no rendered page in {html_dir}"]
    for page in pages:
        text = page.read_text(errors="replace")
        body = text[text.find("<main"):] if "<main" in text else text
        for path in sorted({*MACHINE_PATH.findall(body), *(p for p in forbidden if p and p in body)}):
            problems.append(f"{page.name}: shows the machine path {path}")
        if page.stem in NOTEBOOKS:
            images = [m.start() for m in re.finditer(r"<img ", body)]
            for n, start in enumerate(images):
                end = images[n + 1] if n + 1 < len(images) else len(body)
                if not re.search(r"<strong>Figure [^<]+</strong>", body[start:end]):
                    problems.append(f"{page.name}: figure {n + 1} of {len(images)} has no numbered caption "
                                    "(plots.publish)")
    index = html_dir / "index.html"
    text = index.read_text() if index.is_file() else ""
    redirect = re.search(r'(?i)http-equiv="refresh"[^>]*url=([\w.-]+\.html)', text)  # the book's index points to its root
    if redirect and (html_dir / redirect.group(1)).is_file():
        index = html_dir / redirect.group(1)
        text = index.read_text()
    shown = html_module.unescape(re.sub(r"<[^>]+>", "", text)).replace("\u2019", "'")  # typographic apostrophes
    problems += [f"{index.name}: the scoreboard lacks the claim {c.id!r}" for c in CLAIMS if c.text not in shown]
    return problems
