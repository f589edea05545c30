"""A ranking (:func:`gaptrack.rank_runs`) as text: a table for the terminal, or Markdown.

The one place where the ranking is laid out for people (``gaptrack compare``
and the MLflow project's printed rankings); CSV and JSON are pandas' own, with
every column and every digit.

The terminal table shows what answers "which run, and why": rank, run name,
``fit``, ``eval_train``, ``gap`` and its parts, the diagnosis (and the summary
ranked by, when it is not the last gap), and fits the terminal's width
(``COLUMNS``, else the terminal's, else 80): a long run name is cut with an
ellipsis, a number never is (numeric columns that do not fit are left out,
the last first, and the caption says which). More columns are asked for by name.

It is drawn with ``rich`` (``rich.table.Table``), which MLflow already brings:
it measures every cell, shares the width out among the columns, and cuts or
wraps text to fit, which hand-padded columns (or pandas' ``to_string``, which
never narrows a column) do not.

Numbers. A column's numbers are written with the same number of decimals, the
fewest that give its largest magnitude :data:`DIGITS` significant digits (no
mix of ``-5.96e-08`` beside ``0``: float noise in a column of gaps of 0.1
reads ``0.0000``), and a value that rounds to zero is written without a sign
(never ``-0.0000``).
"""

import io
import math

import numpy as np
import pandas as pd

#: Significant digits of a column's largest magnitude.
DIGITS = 4
#: Most decimals a column gets (its largest magnitude below 1e-7 reads 0).
MAX_DECIMALS = 10
#: The terminal table's columns, in order (``gap_<by>`` joins them when the
#: ranking is not by the final gap).
DEFAULT_COLUMNS = ("rank", "run_name", "fit", "eval_train", "gap", "drift", "mode", "bn_ema",
                   "diagnosis")


class ColumnError(ValueError):
    """A column or param asked for that the ranking does not have."""


def select(ranking, columns=(), params=()):
    """The ranking's terminal columns, then ``columns`` and ``params.<name>`` for ``params``.

    Args:
        ranking: a DataFrame from :func:`gaptrack.rank_runs`.
        columns: more column names (``run_id``, ``status``, ``gap_max_abs``...).
        params: run parameters to show, by name (``batch_size``); their column
            is headed by the name alone.

    Raises:
        ColumnError: a column or param the ranking has not, naming those it has.
    """
    by = ranking.attrs.get("by", "final")
    chosen = [*DEFAULT_COLUMNS[:5], *([f"gap_{by}"] if by != "final" else []),
              *DEFAULT_COLUMNS[5:]]
    for name in columns:
        if name not in ranking.columns or name.startswith("params."):
            raise ColumnError(f"column {name!r} is not in the ranking; columns: "
                              f"{', '.join(c for c in ranking.columns if '.' not in c)}")
    present = [c.removeprefix("params.") for c in ranking.columns if c.startswith("params.")]
    for name in params:
        if name not in present:
            raise ColumnError(f"param {name!r} is not a param of the ranked runs; params: "
                              f"{', '.join(present) or '(none)'}")
    chosen += [c for c in columns if c not in chosen]
    chosen += [f"params.{p}" for p in params]
    return ranking[chosen].rename(columns=lambda c: c.removeprefix("params."))


def format_column(values):
    """``values`` (numbers) as strings with one number of decimals (see the module
    docstring); NaN and missing values are empty."""
    values = pd.to_numeric(pd.Series(values), errors="coerce")
    if values.dtype.kind in "iu":
        return [str(v) for v in values]
    finite = values[np.isfinite(values)]
    largest = finite.abs().max() if len(finite) else 0.0
    decimals = 0 if not largest else DIGITS - 1 - math.floor(math.log10(largest))
    decimals = min(max(decimals, 0), MAX_DECIMALS)

    def text(value):
        if pd.isna(value):
            return ""
        if not math.isfinite(value):
            return str(value)
        formatted = f"{value:.{decimals}f}"
        return formatted.lstrip("-") if float(formatted) == 0 else formatted

    return [text(v) for v in values]


def _cells(table):
    """``{column: [cell text]}`` of ``table``: numbers by :func:`format_column`."""
    return {c: (format_column(table[c]) if table[c].dtype.kind in "iuf"
                else ["" if pd.isna(v) else str(v) for v in table[c]])
            for c in table.columns}


def terminal(table, width=None):
    """``table`` (e.g. from :func:`select`) as a text table at most ``width``
    characters wide (default: the terminal's width, ``COLUMNS``, else 80).

    Numbers are never cut, nor text of at most 8 characters (a status, a short
    parameter): longer text columns are narrowed first (cut with an ellipsis),
    and when the rest does not fit, the last numeric columns are left out (the
    table's caption says which)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False,
                      legacy_windows=False)
    cells = _cells(table)
    numeric = {c for c in cells if table[c].dtype.kind in "iuf"}
    widths = {c: max(map(len, [c, *texts])) if c in numeric
              else min(max(map(len, [c, *texts])), 8) for c, texts in cells.items()}
    shown = list(cells)
    while len(shown) > 2 and sum(widths[c] + 1 for c in shown) - 1 > console.width:
        # the last number goes first: the diagnosis names the part that dominates
        shown.remove(next((c for c in reversed(shown[2:]) if c in numeric), shown[-1]))
    left_out = [c for c in cells if c not in shown]
    # one space between columns: the nine default columns fit 80 characters
    drawn = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0,
                  caption=f"(left out at this width: {', '.join(left_out)})" if left_out
                  else None, caption_justify="left")
    for column in shown:
        if column in numeric:
            drawn.add_column(column, justify="right", width=widths[column])
        else:
            drawn.add_column(column, min_width=widths[column])
    for row in zip(*(cells[c] for c in shown)):
        drawn.add_row(*(Text(cell, no_wrap=True, overflow="ellipsis") for cell in row))
    console.print(drawn)
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())


def markdown(table):
    """``table`` as a Markdown table, every column, numbers as in the terminal."""
    cells = _cells(table)
    lines = [list(cells), ["---"] * len(cells), *map(list, zip(*cells.values()))]
    return "".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |\n"
                   for line in lines)
