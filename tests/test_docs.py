"""The documentation, checked against the code it documents.

- Every ```python block of README.md and of the pages under docs/ runs, page by
  page in one namespace (a page's blocks follow on from each other), against a
  fresh SQLite tracking store. The namespace starts with what the pages call
  ``model``, ``x`` and ``y``: a small compiled BatchNormalization MLP and 512
  samples of its training data. A block preceded by
  ``<!-- docs-test: skip (why) -->`` is not run; one preceded by
  ``<!-- docs-test: needs NAME[, NAME] -->`` runs once ``gaptrack.NAME`` exists.
- Every ``gaptrack ...`` line of a ```bash block parses with the command's own
  options (click), so a renamed option or command breaks here, not for a reader.
- The generated reference pages (scripts/docs_hooks.py) hold every public name of
  ``gaptrack.__all__`` and every key, tag and artifact path of gaptrack/keys.py.
- README: under 150 lines, its test command is what .ci/run reads; the version is
  the CHANGELOG's.
"""

import importlib
import importlib.util
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import click
import keras
import mlflow
import numpy as np
import pytest

import gaptrack

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:^<!-- docs-test: (?P<mark>.*?) -->\n)?^```(?P<lang>\w*)[^\n]*\n"
                   r"(?P<body>.*?)^```\s*$", re.M | re.S)


def blocks(page, lang):
    """``(mark, body)`` of the page's top-level fenced blocks in ``lang``."""
    return [(m["mark"] or "", m["body"]) for m in FENCE.finditer(page.read_text())
            if m["lang"] == lang]


def missing_names(mark):
    """The names a ``needs`` mark asks for that gaptrack does not have (yet)."""
    if not mark.startswith("needs "):
        return []
    return [n.strip() for n in mark[len("needs "):].split(",") if not hasattr(gaptrack, n.strip())]


def prelude():
    """What the pages call ``model``, ``x`` and ``y`` without defining them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return {"__name__": "__docs__", "keras": keras, "np": np, "model": model, "x": x, "y": y}


PYTHON_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(ROOT)) for p in PYTHON_PAGES])
def test_python_examples_run(page, sqlite_uri, capsys):
    namespace = prelude()
    ran, waiting, skipped = 0, [], 0
    try:
        for mark, body in blocks(page, "python"):
            if mark.startswith("skip"):
                skipped += 1
                continue
            missing = missing_names(mark)
            if missing:
                waiting += missing
                continue
            exec(compile(body, f"{page.relative_to(ROOT)} (block)", "exec"), namespace)
            ran += 1
    finally:
        gaptrack.autolog(disable=True)
        while mlflow.active_run():
            mlflow.end_run()
    if not ran:
        pytest.skip(f"{skipped} example(s) marked skip; waiting for gaptrack names: "
                    f"{', '.join(sorted(set(waiting))) or 'none'}")


def parse_command_line(args):
    """Parse ``gaptrack ARGS`` as the command would, without running it."""
    from gaptrack.cli import main

    parent = click.Context(main, info_name="gaptrack")
    command = main.get_command(parent, args[0])
    assert command is not None, f"gaptrack has no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]), parent=parent)


def command_lines():
    lines = []
    for page in PAGES:
        for _, body in blocks(page, "bash"):
            lines += [(page.relative_to(ROOT), line) for line in body.splitlines()
                      if line.strip().startswith("gaptrack ")]
    return lines


def test_command_lines_parse():
    lines = command_lines()
    assert len(lines) >= 5  # README and the compare how-to
    for page, line in lines:
        args = shlex.split(line, comments=True)[1:]
        try:
            parse_command_line(args)
        except click.UsageError as e:
            pytest.fail(f"{page}: `{line.strip()}`: {e.format_message()}")


def test_command_line_check_catches_a_renamed_option():
    with pytest.raises(click.UsageError, match="--metrc"):
        parse_command_line(["compare", "-e", "x", "--metrc", "loss"])
    with pytest.raises(click.UsageError, match="nope"):
        parse_command_line(["compare", "-e", "x", "--by", "nope"])


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_api_page_documents_every_public_name():
    page = load_hooks().api_page()
    directives = re.findall(r"^::: (\S+)$", page, re.M)
    documented = {}
    for path in directives:
        module, _, name = path.rpartition(".")
        documented[name] = getattr(importlib.import_module(module), name)
    public = [n for n in gaptrack.__all__ if not n.startswith("__")]
    assert sorted(documented) == sorted(public)
    for name in public:  # each directive names the object gaptrack exports
        assert documented[name] is getattr(gaptrack, name), name
    assert gaptrack.__version__ in page


def test_keys_page_lists_every_key_tag_and_artifact():
    import gaptrack.keys as keys

    page = load_hooks().keys_page()
    spelled = []
    for name, value in vars(keys).items():
        if name.isupper() and isinstance(value, str):
            spelled.append(value)
        elif name.isupper() and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            spelled += value
    assert len(spelled) > 30
    for value in spelled:
        assert f"`{value}`" in page, value
    assert "| `gap/<m>` | `fit - eval_train` |" in page  # the namespace table, as Markdown
    assert "::: gaptrack.keys.metric_key" in page


def test_readme_is_short_and_ci_reads_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    for marker in ("<!-- main-command -->", "<!-- test-command -->", "<!-- docs-command -->"):
        assert marker in readme
    block = readme.split("<!-- test-command -->\n```bash\n", 1)[1].split("\n", 1)[0]
    sed = subprocess.run(["sed", "-n", "/<!-- test-command -->/{n;n;p;q}", "README.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert sed == block == "pip install -e '.[test]' && python -m pytest -q"
    docs = readme.split("<!-- docs-command -->\n```bash\n", 1)[1].split("\n", 1)[0]
    assert docs.endswith("mkdocs build --strict")
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'bash -c "$test_command"' in ci and 'bash -c "$docs_command"' in ci


def test_version_moves_with_the_changelog():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gaptrack.__version__"}
    releases = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    version = gaptrack.__version__
    if ".dev" in version:  # this round, not released yet
        assert releases[0] == "Unreleased"
        assert version.split(".dev")[0] not in releases
    else:
        assert version == next(r for r in releases if r != "Unreleased")


def test_docstrings_rest_becomes_markdown():
    doc = ("Sum :func:`gaptrack.decompose.decompose` parts::\n\n"
           "    gap = drift + mode + bn_ema\n\n"
           "Example:\n"
           "    >>> decompose(fit, eval_train)\n"
           "    Parts(gap=0.1)\n\n"
           "Done.")
    assert load_hooks().rst_to_markdown(doc).splitlines() == [
        "Sum `gaptrack.decompose.decompose` parts:", "",
        "```text", "gap = drift + mode + bn_ema", "```", "",
        "Example:",
        "    ```pycon", "    >>> decompose(fit, eval_train)", "    Parts(gap=0.1)", "    ```", "",
        "Done."]
