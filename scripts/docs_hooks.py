"""MkDocs hooks: the reference pages generated from the code at build time.

- ``reference/api.md``: one section per name of ``gaptrack.__all__``, rendered by
  mkdocstrings from its signature and docstring, so a public name added to the
  package appears without editing the docs.
- ``reference/keys.md``: every metric key, tag and artifact path, read from
  ``gaptrack/keys.py`` (its namespace table, its constants with their ``#:``
  comments, its key-building functions).

``RstDocstrings``, a griffe extension, lets mkdocstrings render the docstrings'
reST touches (``:class:`x``` roles, ``::`` literal blocks, ``>>>`` examples) as
Markdown.

The build documents the checkout it runs in: the repository's root goes first
on ``sys.path`` and ``PYTHONPATH`` (the tutorial notebook's kernel inherits it,
and ``TF_CPP_MIN_LOG_LEVEL=2``).
"""

import ast
import importlib
import os
import re
import sys
from pathlib import Path

import griffe
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
KEYS_SOURCE = ROOT / "gaptrack" / "keys.py"


def on_config(config):
    # TensorFlow's start-up lines off in the notebook's kernel, as the project's
    # entry points do (its oneDNN line prints at any level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return config


def on_files(files, config):
    for uri, content in (("reference/api.md", api_page()), ("reference/keys.md", keys_page())):
        files.append(File.generated(config, uri, content=content))
    return files


#: TensorFlow's C++ log lines (absl), which it writes to the kernel's stderr at
#: import before any log level applies; not the notebook's content.
_TF_LOG_LINE = re.compile(r"^(?:WARNING: All log messages before absl::InitializeLog\(\).*"
                          r"|[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"
                          r"|To enable the following instructions: .*)\n?", re.M)
_STDERR = re.compile(r'(<div class="jp-RenderedText[^"]*" data-mime-type="application/'
                     r'vnd\.jupyter\.stderr"[^>]*>\s*<pre>)(.*?)(</pre>)', re.S)
_EMPTY_OUTPUT = re.compile(r'<div class="jp-OutputArea-child">\s*<div class="jp-OutputPrompt'
                           r'[^"]*"></div>\s*<div class="jp-RenderedText[^"]*" data-mime-type='
                           r'"application/vnd\.jupyter\.stderr"[^>]*>\s*<pre></pre>\s*</div>'
                           r'\s*</div>', re.S)


def on_page_content(html, page, config, files):
    """A notebook's stderr outputs without TensorFlow's start-up log lines."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    html = _STDERR.sub(lambda m: m[1] + _TF_LOG_LINE.sub("", m[2]).strip() + m[3], html)
    return _EMPTY_OUTPUT.sub("", html)


# -- the Python API -------------------------------------------------------------------


def public_names():
    """``gaptrack.__all__`` without the dunders, each with the module defining it."""
    gaptrack = importlib.import_module("gaptrack")
    names = sorted((n for n in gaptrack.__all__ if not n.startswith("__")), key=str.lower)
    # gaptrack._PUBLIC maps every public name to its module, without importing Keras
    return gaptrack.__version__, [(n, gaptrack._PUBLIC[n]) for n in names]


def api_page():
    version, names = public_names()
    lines = ["# Python API", "",
             f"Every public name of `gaptrack` {version} (`gaptrack.__all__`), with its "
             "signature and docstring, generated from the code at build time. "
             "The command line over the same functions is in [CLI](cli.md); the keys "
             "they log are in [Keys, tags and artifacts](keys.md).", ""]
    lines += [f"- [`gaptrack.{name}`](#{name.lower()})" for name, _ in names]
    for name, module in names:
        lines += ["", f"## `gaptrack.{name}` {{#{name.lower()}}}", "",
                  f"::: {module}.{name}",
                  "    options:",
                  "      show_root_heading: false",
                  "      heading_level: 3", ""]
    return "\n".join(lines)


# -- keys, tags, artifacts -------------------------------------------------------------


_ROLE = re.compile(r":(?:mod|func|class|meth|attr|exc|data|obj):`~?([^`]+)`")


def _inline(text):
    """reST inline markup of the docstrings as Markdown."""
    return _ROLE.sub(r"`\1`", text).replace("``", "`")


def _indent(line):
    return len(line) - len(line.lstrip())


def rst_to_markdown(doc):
    """A docstring's reST roles, ``::`` literal blocks and ``>>>`` sessions as
    Markdown (inline code, fenced blocks); the Google sections are kept."""
    lines, out, i = doc.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            pad, block = " " * _indent(line), []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(pad):])
                i += 1
            out += [pad + "```pycon", *(pad + b for b in block), pad + "```"]
            continue
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            text = line.rstrip()[:-2].rstrip()
            out.append(_ROLE.sub(r"`\1`", text + ":" if text else ""))
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block, pad = [], _indent(lines[j]) if j < len(lines) else 0
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) >= pad) \
                    and pad > _indent(line):
                block.append(lines[j][pad:])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                fence = " " * _indent(line)
                out += ["", fence + "```text", *(fence + b for b in block), fence + "```", ""]
                i = j
                continue
            i += 1
            continue
        out.append(_ROLE.sub(r"`\1`", line))
        i += 1
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """mkdocstrings' docstrings through :func:`rst_to_markdown`."""

    def on_object(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)


def _rst_table(lines):
    """A reST simple table (``====  ====`` rules) as Markdown rows."""
    rule = next(line for line in lines if line.startswith("="))
    starts = [m.start() for m in re.finditer(r"=+", rule)]
    rows = []
    for line in lines:
        if line.startswith("=") or not line.strip():
            continue
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        if rows and (not cells[0] or rows[-1][0].endswith(",")):  # a continuation line
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    out = ["| key | what it is |", "|---|---|"]
    return out + ["| " + " | ".join(_inline(c).replace("|", "\\|") for c in row) + " |"
                  for row in rows]


def _docstring_markdown(doc):
    """The module docstring, its reST tables (from a ``====`` rule to the next
    blank line) as Markdown tables."""
    out, table = [], []
    for line in doc.splitlines() + [""]:
        if table and line.strip():
            table.append(line)
        elif table:
            out += _rst_table(table) + [""]
            table = []
        elif line.startswith("="):
            table = [line]
        else:
            out.append(_inline(line))
    return "\n".join(out).rstrip()


def _constants(tree, source_lines):
    """``(section, name, value, comment)`` of the module's upper-case constants
    whose value is a string or a tuple of strings; sections are the ``# -- x --``
    rules of the source."""
    sections = {i + 1: m.group(1).strip() for i, line in enumerate(source_lines)
                if (m := re.match(r"#\s*--\s*(.+?)\s*-{3,}\s*$", line))}
    found = []
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        if not all(isinstance(n, ast.Name) and n.id.isupper() for n in names):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        values = value if isinstance(target, ast.Tuple) else (value,)
        section = next((sections[i] for i in sorted(sections, reverse=True)
                        if i < node.lineno), "metric keys")
        comment, line = [], node.lineno - 2
        while line >= 0 and source_lines[line].lstrip().startswith("#:"):
            comment.insert(0, source_lines[line].lstrip()[2:].strip())
            line -= 1
        for name, v in zip((n.id for n in names), values):
            if isinstance(v, str) or (isinstance(v, tuple) and all(isinstance(x, str) for x in v)):
                found.append((section, name, v, _inline(" ".join(comment))))
    return found


def keys_page():
    source = KEYS_SOURCE.read_text()
    tree = ast.parse(source)
    lines = ["# Keys, tags and artifacts", "",
             "Everything gaptrack writes to MLflow, generated at build time from "
             "`gaptrack/keys.py`, the one module that spells a key and parses it back.", "",
             "## The namespace", "", _docstring_markdown(ast.get_docstring(tree)), ""]
    section = None
    for sect, name, value, comment in _constants(tree, source.splitlines()):
        if sect != section:
            section = sect
            lines += ["", f"## {sect.capitalize()}", "",
                      "| constant | value | note |", "|---|---|---|"]
        shown = ", ".join(f"`{v}`" for v in value) if isinstance(value, tuple) else f"`{value}`"
        lines.append(f"| `{name}` | {shown} | {comment.replace('|', chr(92) + '|')} |")
    builders = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                and not n.name.startswith("_") and n.name.endswith(("_key", "_path"))]
    lines += ["", "## How a key is built", ""]
    for name in builders:
        lines += [f"::: gaptrack.keys.{name}", "    options:", "      heading_level: 3",
                  "      show_root_heading: true", ""]
    return "\n".join(lines) + "\n"
