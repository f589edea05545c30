"""gaptrack: why does Keras' ``fit()`` disagree with ``evaluate()`` on the same data?

Measures, per epoch, what ``fit()`` reported, what ``evaluate()`` says on the
training data, a training-mode re-measurement and a PreciseBN one, decomposes the
gap into its causes (drift, mode, bn_ema) and logs it all to MLflow.

The public names are imported lazily so that ``import gaptrack`` (and the
``gaptrack`` command) does not pay for importing TensorFlow until a Keras-facing
function is used.
"""

import importlib

__version__ = "0.2.0.dev0"  # pyproject.toml reads it; see CHANGELOG.md

_PUBLIC = {
    "GapTracker": "gaptrack.callback",
    "Report": "gaptrack.report",
    "explain": "gaptrack.explaining",
    "load_run": "gaptrack.runs",
    "autolog": "gaptrack.autologging",
    "measure": "gaptrack.measurement",
    "Measurement": "gaptrack.measurement",
    "recalibrate_bn": "gaptrack.recalibrate",
    "load_bn_snapshots": "gaptrack.snapshots",
    "rank_runs": "gaptrack.compare",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gaptrack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
