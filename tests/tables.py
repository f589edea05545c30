"""Reading a printed ranking table (:mod:`gaptrack.ranktable`) back, for tests."""

import re


def read_table(text):
    """``(columns, rows)`` of a table whose cells hold no spaces: the header's
    words and each row's, up to the rule's end (a caption after it is skipped)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"─"})
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip() or line.startswith("("):
            break
        rows.append(line.split())
    return lines[rule - 1].split(), rows


def decimals(cell):
    """Digits after the point of a number as printed."""
    match = re.fullmatch(r"-?\d+(?:\.(\d+))?", cell)
    assert match, cell
    return len(match.group(1) or "")
