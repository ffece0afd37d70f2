"""Profiles and notebooks agree: every profile parameter is a parameter of its notebook."""
import ast

import jupytext
import pytest

from mtlcore.book import NOTEBOOKS, PROJECT_ROOT, profile_parameters, profiles


def notebook_parameters(name: str) -> dict:
    notebook = jupytext.read(PROJECT_ROOT / "notebooks" / f"{name}.py")
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    names = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{name}: the parameters cell holds assignments only"
        names[node.targets[0].id] = ast.literal_eval(node.value)
    return names


def test_three_profiles_exist():
    assert {"smoke", "quick", "paper"} <= set(profiles())


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_profile_keys_are_notebook_parameters(profile):
    for name, params in profile_parameters(profile).items():
        valid = notebook_parameters(name)
        unknown = set(params) - set(valid)
        assert not unknown, f"{profile}/{name}.yaml sets {sorted(unknown)}, which {name}.py does not take"


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_profile_runs_are_valid_configs(profile):
    """Every run a profile will ask for passes validation before anything trains."""
    from mtlcore.training import RunConfig, base_config

    for name, params in profile_parameters(profile).items():
        p = {**notebook_parameters(name), **params}
        if "study_settings" in p:  # paper B's chapter: tests/test_tuned.py checks its runs
            continue
        if "set_sizes" in p:  # §5's chapter: tests/test_conflict_study.py checks its runs
            continue
        for partner in [None] + p["partners"]:
            tasks = [p["target"]] + ([partner] if partner else [])
            for aggregator in ["uniform"] + p.get("aggregators", []):
                RunConfig.from_dict(base_config(p) | {"tasks": tasks, "aggregator": aggregator})


def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'fast'; valid profiles: \["):
        profile_parameters("fast")


def test_notebooks_are_known():
    assert NOTEBOOKS and all((PROJECT_ROOT / "notebooks" / f"{n}.py").exists() for n in NOTEBOOKS)


def test_cli_reports_bad_input_without_a_traceback(capsys):
    from mtlcore.cli import main

    assert main(["batch", "--profile", "fast"]) == 2
    assert "unknown profile 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("tasks: [fashion1\n", "is not valid YAML"),
    ("- tasks\n- lr\n", "a run config is a mapping"),
    ("setting: fashion_mtl\ntasks: [fashion1]\ndevice: cuda:7\n", "device="),  # no such GPU here (or no GPU at all)
    ("tasks: [fashion1]\n", "config needs `setting`: one of ['celeba', 'cifar100',"),
])
def test_cli_run_reports_bad_files_without_a_traceback(tmp_path, capsys, text, message):
    from mtlcore.cli import main

    (tmp_path / "c.yaml").write_text(text)
    code = main(["run", str(tmp_path / "c.yaml"), "--results-dir", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from mtlcore import training
    from mtlcore.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run", interrupted)
    (tmp_path / "c.yaml").write_text("setting: fashion_mtl\ntasks: [fashion1]\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--results-dir", str(tmp_path / "out")]) == 130
    assert "the same command resumes" in capsys.readouterr().err


@pytest.mark.parametrize("grid, message", [
    ("{lr: 0.1}", "grid: lr=0.1 must be a non-empty list of values, e.g. lr: [0.1]"),
    ("{aggregator: pcgrad}", "grid: aggregator='pcgrad' must be a non-empty list"),
    ("{seed: []}", "grid: seed has no values"),
])
def test_cli_sweep_refuses_grid_values_that_are_not_lists(tmp_path, capsys, grid, message):
    from mtlcore.cli import main

    (tmp_path / "g.yaml").write_text(f"base: {{setting: fashion_mtl, tasks: [fashion1]}}\ngrid: {grid}\n")
    assert main(["sweep", str(tmp_path / "g.yaml"), "--results-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_grid_takes_any_iterable_of_values():
    from mtlcore.training import grid

    configs = grid({"setting": "fashion_mtl", "tasks": ["fashion1"]}, seed=range(2), lr=(0.1,))
    assert [(c.seed, c.lr) for c in configs] == [(0, 0.1), (1, 0.1)]


def test_environment_yml_pins_match_pyproject():
    """environment.yml's pip section carries the same pinned versions as pyproject.toml."""
    import tomllib

    import yaml

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    pinned = {d for d in project if "==" in d}
    assert pinned and pinned <= set(pip)
    assert "python=3.11" in env


def test_cli_data_names_the_optional_files_it_lacks(fake_data_root, tmp_path, capsys):
    from conftest import write_fake_mnist_folder
    from mtlcore.cli import main

    assert main(["data", "fashion_mtl", "--data-root", str(fake_data_root)]) == 0
    out = capsys.readouterr().out
    assert "required files are present" in out and "missing (optional)" in out and "train-images-idx3-ubyte.gz" in out
    write_fake_mnist_folder(tmp_path / "fashion-mnist", 1200, 400, seed=1)
    write_fake_mnist_folder(tmp_path / "notmnist", 100, 600, seed=2, with_train=True)
    assert main(["data", "fashion_mtl", "--data-root", str(tmp_path)]) == 0
    assert "missing" not in capsys.readouterr().out


def test_base_config_takes_every_run_config_key():
    """A notebook parameter that is a run-config key reaches the runs (no hand-kept list that drops a new key)."""
    from mtlcore.training import RunConfig, base_config

    parameters = {"setting": "fashion_mtl", "model": "lenet_fused", "model_options": {"dropout": 0.25},
                  "head_update": "weighted", "target": "fashion1", "partners": ["fashion2"], "profile": "quick"}
    assert base_config(parameters) == {k: v for k, v in parameters.items() if k in RunConfig.fields()}
    assert set(base_config(parameters)) == {"setting", "model", "model_options", "head_update"}


def test_cli_data_lists_the_settings(capsys):
    from mtlcore.cli import main

    assert main(["data", "--list"]) == 0
    assert "fashion_mtl: FashionMTL, tasks fashion1, fashion2, noisy_fashion, notmnist" in capsys.readouterr().out
    assert main(["data", "cifar"]) == 2
    assert "unknown setting 'cifar'; valid settings: ['celeba', 'cifar100'," in capsys.readouterr().err


def test_jupyter_book_executes_the_chapters_batch_did_not(tmp_path, monkeypatch):
    """The Sphinx hook behind `jupyter-book build book`: the missing chapters, with $MTLCORE_PROFILE or quick."""
    from types import SimpleNamespace

    import mtlcore.book as book

    calls, hooks = [], {}
    monkeypatch.setattr(book, "run_batch", lambda profile, **kw: calls.append((profile, kw["notebooks"])))
    monkeypatch.setattr(book, "write_generated_pages", lambda *args: calls.append(("pages", args[0])))
    book.setup(SimpleNamespace(connect=lambda event, f: hooks.setdefault(event, f)))
    app = SimpleNamespace(srcdir=str(tmp_path))
    monkeypatch.delenv("MTLCORE_PROFILE", raising=False)
    hooks["config-inited"](app, None)
    assert calls == [("quick", list(NOTEBOOKS))]
    (tmp_path / f"{NOTEBOOKS[0]}.ipynb").write_text("{}")
    monkeypatch.setenv("MTLCORE_PROFILE", "smoke")
    hooks["config-inited"](app, None)
    assert calls[-1] == ("smoke", list(NOTEBOOKS[1:]))
    for name in NOTEBOOKS:
        (tmp_path / f"{name}.ipynb").write_text("{}")
    hooks["config-inited"](app, None)  # nothing to execute: the generated pages only
    assert calls[-1] == ("pages", "smoke") and book.missing_chapters(tmp_path) == []


def test_executed_notebooks_show_no_machine_path(tmp_path):
    import json

    from mtlcore.book import hide_machine_paths

    cells = [{"cell_type": "code", "metadata": {"tags": ["injected-parameters"]}, "outputs": [],
              "source": 'results_dir = "/home/me/mtl/results/quick"\ndata_root = "/data/sets"\n'},
             {"cell_type": "code", "metadata": {}, "source": "print(1)",
              "outputs": [{"output_type": "stream", "text": ["written to /home/me/mtl/results/quick/a.nc\n"]},
                          {"output_type": "display_data", "data": {"text/markdown": "files under /data/sets/x"}}]}]
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    hide_machine_paths(path, {"/home/me/mtl/results/quick": "<results folder>", "/data/sets": "<data root>"})
    text = path.read_text()
    assert "/home/me" not in text and "/data/sets" not in text
    out = json.loads(text)["cells"]
    assert out[0]["metadata"]["tags"] == ["injected-parameters", "hide-cell"]
    assert out[0]["source"] == 'results_dir = "<results folder>"\ndata_root = "<data root>"\n'
    assert out[1]["outputs"][0]["text"] == "written to <results folder>/a.nc\n"
    assert out[1]["outputs"][1]["data"]["text/markdown"] == "files under <data root>/x"


def test_a_misspelled_profile_key_is_an_error_naming_the_valid_ones(tmp_path):
    import shutil

    shutil.copytree(PROJECT_ROOT / "params" / "profiles" / "smoke", tmp_path / "profiles" / "mine")
    path = tmp_path / "profiles" / "mine" / "sec3_transfer.yaml"
    path.write_text(path.read_text() + "\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"'learning_rate' is not a parameter of notebook sec3_transfer; "
                                         r"valid: \[.*'lr'"):
        profile_parameters("mine", tmp_path)
    path.write_text(path.read_text().replace("learning_rate", "epoch"))
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        profile_parameters("mine", tmp_path)


def test_an_interrupted_batch_leaves_no_notebook_that_reads_as_complete(tmp_path, monkeypatch):
    import papermill

    from mtlcore.book import run_batch

    def interrupted(notebook, output, **kwargs):  # papermill writes the output as it goes, then the user presses ^C
        jupytext.write(notebook, output, fmt="ipynb")
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    (tmp_path / "sec4_1_factors.ipynb").write_text("{}")  # from an earlier, finished batch
    with pytest.raises(KeyboardInterrupt):
        run_batch("smoke", notebooks=["sec3_transfer"], book_dir=tmp_path, results_root=tmp_path / "results",
                  progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["sec4_1_factors.ipynb"]

    def finished(notebook, output, **kwargs):
        jupytext.write(notebook, output, fmt="ipynb")

    monkeypatch.setattr(papermill, "execute_notebook", finished)
    assert run_batch("smoke", notebooks=["sec3_transfer"], book_dir=tmp_path, results_root=tmp_path / "results",
                     progress=False) == [tmp_path / "sec3_transfer.ipynb"]
    assert (tmp_path / "sec3_transfer.ipynb").is_file()


def test_the_paper_sections_5_without_its_data_says_not_run_and_trains_nothing(tmp_path):
    """§5 in `paper` (CIFAR-100 targets on a GPU) on a machine that lacks the data (and here a GPU): the chapter
    executes, says why nothing ran, and leaves no run and no analysis file."""
    import json

    from mtlcore.book import run_batch

    empty = tmp_path / "data"
    empty.mkdir()
    [executed] = run_batch("paper", notebooks=["sec5_conflict"], book_dir=tmp_path / "book", data_root=str(empty),
                           results_root=tmp_path / "results", progress=False)
    text = "".join("".join(output.get("data", {}).get("text/markdown", ""))
                   for cell in json.loads(executed.read_text())["cells"] for output in cell.get("outputs", []))
    assert "CIFAR-100 not run:" in text and "Nothing below was computed on this machine" in text
    assert not list((tmp_path / "results" / "paper").glob("runs/*.nc"))
    assert not (tmp_path / "results" / "paper" / "sec5_conflict.nc").exists()


def test_the_rendered_book_check_finds_paths_uncaptioned_figures_and_missing_claims(tmp_path):
    from mtlcore.analysis.claims import CLAIMS
    from mtlcore.book import check_rendered

    chapter = NOTEBOOKS[0]
    claims_html = "".join(f"<td>{c.text}</td>".replace("'", "\u2019") for c in CLAIMS)  # as Sphinx typesets them
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=intro.html" />')
    (tmp_path / "intro.html").write_text(f"<main><table>{claims_html}</table></main>")
    (tmp_path / f"{chapter}.html").write_text(
        '<main><img src="a.png"><p><strong>Figure 1 (paper A).</strong> A caption.</p>'
        '<a href="https://example.org/home/page">link</a><img src="b.png"><p>no caption</p></main>')
    problems = check_rendered(tmp_path)
    assert problems == [f"{chapter}.html: figure 2 of 2 has no numbered caption (plots.publish)"]
    (tmp_path / "intro.html").write_text(f"<main>{claims_html[:-200]} written to /home/ana/results/x.nc "
                                         "and /srv/build/data</main>")
    problems = check_rendered(tmp_path, ["/srv/build"])
    assert "intro.html: shows the machine path /home/ana" in problems and "intro.html: shows the machine path /srv/build" in problems
    assert f"intro.html: the scoreboard lacks the claim {CLAIMS[-1].id!r}" in problems
