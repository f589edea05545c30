"""Typed parameters of the entry points and scenarios, checked with one clear line.

``mlflow run`` hands every parameter to the command as text (it checks no type),
and appends parameters the ``MLproject`` does not declare as ``--name value``.
Here each parameter is a :class:`Param`: its kind, its default and what values
it accepts. :func:`parse` reads ``--name value`` tokens against a table of them
and raises :class:`ParamError` naming the bad value and what would be accepted:

    >>> parse(pairs(["--epochs", "0"]), {"epochs": integer(5, minimum=1)})
    Traceback (most recent call last):
    ...
    projects.params.ParamError: epochs must be an integer >= 1, got '0'
"""

import math
from dataclasses import dataclass
from typing import Callable


class ParamError(ValueError):
    """A parameter value that is not accepted; the message says what is."""


@dataclass(frozen=True)
class Param:
    """One parameter: ``convert(name, text)`` returns its value or raises ParamError.

    Attributes:
        default: the value used when the parameter is not given (already converted).
        convert: ``(name, text) -> value``.
        accepts: what values are accepted, for ``--help``.
    """

    default: object
    convert: Callable
    accepts: str

    def with_default(self, default):
        return Param(default, self.convert, self.accepts)


def integer(default, minimum=None):
    """An integer, optionally ``>= minimum``."""
    bound = "" if minimum is None else f" >= {minimum}"

    def convert(name, text):
        try:
            value = int(str(text).strip())
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            raise ParamError(f"{name} must be an integer{bound}, got {text!r}")
        return value

    return Param(default, convert, f"integer{bound}")


def number(default, low=None, high=None, *, low_open=False, high_open=False):
    """A finite float in an interval: ``low``/``high`` ``None`` for unbounded,
    ``*_open`` to exclude the end point."""
    interval = ""
    if low is not None or high is not None:
        interval = " in " + ("(" if low_open or low is None else "[") + \
            ("-inf" if low is None else f"{low:g}") + ", " + \
            ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]")

    def convert(name, text):
        try:
            value = float(str(text).strip())
        except ValueError:
            value = math.nan
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise ParamError(f"{name} must be a number{interval}, got {text!r}")
        return value

    return Param(default, convert, f"number{interval}")


def choice(default, choices):
    """One of ``choices`` (strings)."""
    choices = tuple(choices)

    def convert(name, text):
        if text not in choices:
            raise ParamError(f"{name} {text!r} is unknown; choose one of: {', '.join(choices)}")
        return text

    return Param(default, convert, "one of: " + ", ".join(choices))


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def flag(default):
    """A switch given as 0/1 (or true/false, yes/no); its value is 0 or 1, so
    that it is logged as MLflow shows what the user typed, ``bn=1``."""

    def convert(name, text):
        lowered = str(text).strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ParamError(f"{name} must be 0 or 1 (or true/false), got {text!r}")
        return int(lowered in _TRUE)

    return Param(default, convert, "0 or 1")


def text(default):
    """Any string."""
    return Param(default, lambda name, value: value, "text")


def count_or_all(default="all"):
    """A positive integer, or ``all``."""
    ints = integer(None, minimum=1)

    def convert(name, value):
        if str(value).strip().lower() == "all":
            return "all"
        try:
            return ints.convert(name, value)
        except ParamError:
            raise ParamError(f"{name} must be an integer >= 1 or 'all', got {value!r}") from None

    return Param(default, convert, "integer >= 1, or all")


def pairs(tokens):
    """Command-line tokens ``--name value`` (or ``--name=value``) to a list of
    ``(name, value)``; a ``-`` in a name reads as ``_``."""
    out, tokens = [], list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or token == "--":
            raise ParamError(f"expected --name value, got {token!r}")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if not tokens:
                raise ParamError(f"{name} needs a value: --{name} VALUE")
            value = tokens.pop(0)
        out.append((name, value))
    return out


def parse(given, params, what=""):
    """``(name, value)`` pairs (see :func:`pairs`) to ``{name: value}`` over
    ``params``' defaults.

    Args:
        given: the pairs given.
        params: ``{name: Param}``, the parameters accepted.
        what: who accepts them, for the message naming an unknown one
            (e.g. ``"scenario dense_l2"``).

    Returns:
        ``(values, names)``: every parameter's value, and the names given.
    """
    values = {name: p.default for name, p in params.items()}
    names = set()
    for name, value in given:
        if name not in params:
            owner = f" by {what}" if what else ""
            raise ParamError(f"parameter {name!r} is not accepted{owner}; accepted: "
                             f"{', '.join(sorted(params))}")
        if name in names:
            raise ParamError(f"{name} is given twice")
        values[name] = params[name].convert(name, value)
        names.add(name)
    return values, names


def describe(params):
    """``--help`` lines: one per parameter, with what it accepts and its default."""
    width = max((len(n) for n in params), default=0)
    return "\n".join(f"  --{name:<{width}}  {p.accepts} (default: {p.default})"
                     for name, p in params.items())


def dataset(default="digits"):
    """A built-in data set name or the path of a ``.npz``/``.csv`` file
    (see :func:`projects.datasets.load_dataset`)."""

    def convert(name, value):
        from projects.datasets import DATASETS  # imports scikit-learn: only when checking

        if value in DATASETS or str(value).lower().endswith((".npz", ".csv")):
            return value
        raise ParamError(f"{name} {value!r} is unknown; choose one of: {', '.join(DATASETS)}, "
                         f"or the path of a .npz or .csv file")

    return Param(default, convert, "a built-in data set (digits, ...) or a .npz/.csv path")


#: The parameters every scenario may take, with what they accept. A scenario
#: picks those that apply to it and its own defaults through :func:`common`.
_COMMON = {
    "dataset": dataset(),
    "samples": count_or_all(),
    "epochs": integer(None, minimum=1),
    "batch_size": integer(None, minimum=1),
    "learning_rate": number(None, 0, None, low_open=True),
    "validation_split": number(None, 0, 1, high_open=True),
}


def common(**defaults):
    """The shared parameters a scenario accepts, with its defaults, plus
    ``probe_size`` and ``seed``, which every scenario accepts.

    Example:
        >>> sorted(common(epochs=1, batch_size=32))
        ['batch_size', 'epochs', 'probe_size', 'seed']
    """
    unknown = set(defaults) - set(_COMMON)
    if unknown:
        raise TypeError(f"not common parameters: {sorted(unknown)}")
    params = {name: _COMMON[name].with_default(value) for name, value in defaults.items()}
    from gaptrack.probe import DEFAULT_PROBE_SIZE

    params["probe_size"] = integer(DEFAULT_PROBE_SIZE, minimum=1)
    params["seed"] = integer(0, minimum=0)
    return params
