"""gaptrack.ranktable: a column's numbers at one number of decimals, no negative
zero, and the terminal table within its width, against numpy's rounding."""

import numpy as np
import pandas as pd
import pytest

from gaptrack.ranktable import ColumnError, format_column, markdown, select, terminal
from tables import read_table


@pytest.mark.parametrize("values", [
    [0.1234567, -5.96e-08, 0.0, -0.00004, 1.5],
    [-1234.5678, 0.25, 7.0],
    [3e-9, -1e-9],
])
def test_a_columns_numbers_share_their_decimals_and_round_as_numpy(values):
    largest = max(abs(v) for v in values)
    decimals = min(max(4 - 1 - int(np.floor(np.log10(largest))), 0), 10)
    cells = format_column(values + [float("nan")])
    assert cells[-1] == ""
    for value, cell in zip(values, cells):
        assert len(cell.partition(".")[2]) == decimals
        assert float(cell) == np.round(value, decimals)
        assert not cell.startswith("-") or float(cell) < 0  # no negative zero


def test_integers_stay_integers():
    assert format_column(pd.Series([1, 22, 333])) == ["1", "22", "333"]


def ranking(n=3):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "rank": range(1, n + 1), "run_id": [f"{i:032x}" for i in range(n)],
        "run_name": [f"run-{i}-with-a-rather-long-name" for i in range(n)],
        "experiment": "e", "status": "FINISHED",
        **{c: rng.normal(size=n) for c in ("gap_final", "gap_max_abs", "gap_mean_abs", "fit",
                                           "eval_train", "gap", "drift", "mode", "bn_ema")},
        "diagnosis": "drift", "params.lr": "0.1"})
    frame.attrs["by"] = "final"
    return frame


@pytest.mark.parametrize("width", [50, 80, 160])
def test_the_terminal_table_fits_its_width_and_never_cuts_a_number(width):
    frame = ranking()
    text = terminal(select(frame, columns=["status"], params=["lr"]), width=width)
    assert max(map(len, text.splitlines())) <= width
    columns, rows = read_table(text)
    for name in set(columns) & {"fit", "eval_train", "gap", "drift", "mode", "bn_ema"}:
        cells = [row[columns.index(name)] for row in rows]
        assert cells == format_column(frame[name])
    for name, value in (("status", "FINISHED"), ("lr", "0.1")):  # 8 characters or fewer: whole
        assert {row[columns.index(name)] for row in rows} == {value}


def test_unknown_columns_are_named_with_those_accepted():
    with pytest.raises(ColumnError, match=r"column 'nope' is not in the ranking; columns: rank"):
        select(ranking(), columns=["nope"])
    with pytest.raises(ColumnError, match=r"param 'bs' is not a param .*; params: lr"):
        select(ranking(), params=["bs"])


def test_markdown_keeps_every_column():
    lines = markdown(ranking()).splitlines()
    assert lines[0].split(" | ")[1:3] == ["run_id", "run_name"] and "params.lr" in lines[0]
    assert len(lines) == 5
