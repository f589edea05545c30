"""``gaptrack.autolog()``: track every ``fit()`` without touching the training code.

Like ``mlflow.keras.autolog()``, it patches ``keras.Model.fit``. Each call then
gets a :class:`gaptrack.GapTracker` whose probe is the training data given to
``fit`` (without the ``validation_split`` part) and whose batch size is ``fit``'s
(Keras' default 32 for arrays; a dataset's own batches). ``fit``'s
``class_weight`` is passed on to it (a ``probe`` given to ``autolog`` is
measured as it is). A ``fit`` that already has a ``GapTracker`` among its
callbacks is left as it is.

``fit`` on an infinite dataset (``dataset.repeat()`` with ``steps_per_epoch``)
has no finite training set to measure: unless a ``probe`` is given, the probe
is one fixed draw of the pipeline, read once at train begin from a copy of it
that leaves ``fit``'s reading untouched (:meth:`gaptrack.probe.Probe.from_pipeline`:
its first whole batches, at most ``steps_per_epoch`` of them and at most
``probe_size`` samples), with one :class:`ProbeWarning` saying so. A
``keras.utils.PyDataset`` is indexable: the probe is drawn from its batches.

What autolog cannot measure on, it does not stop: a generator (or any other
one-shot iterator), which only ``fit`` can read, a pipeline that cannot be
copied without sharing state with ``fit``, training data that is no probe
(no targets): ``fit/*`` is logged without measurements, after one
:class:`ProbeWarning` saying why and how to give a probe, and training is
untouched. (``GapTracker(data)`` built by hand refuses such data at once.)
"""

import collections.abc
import importlib
import importlib.util
import os
import sys
import warnings

import keras

from gaptrack.callback import GapTracker
from gaptrack.fitparams import KERAS_DEFAULT_BATCH_SIZE
from gaptrack.fitpatch import FitPatch
from gaptrack.keras3 import require_keras3
from gaptrack.probe import (Probe, ProbeError, ProbeWarning, _is_py_dataset, _is_tf_dataset,
                            check_positive_int)

_settings = {}
#: ``[patch of keras.Model.fit, patch of tf_keras.Model.fit]`` once enabled.
_patches = []


def autolog(disable=False, *, probe=None, probe_size=None, every=1, seed=0,
            bn_snapshots=True):
    """Track every ``keras.Model.fit`` call with a :class:`GapTracker`.

    It composes with ``mlflow.keras.autolog()`` and ``mlflow.tensorflow.autolog()``,
    enabled before or after it (:mod:`gaptrack.fitpatch`): one run then holds
    MLflow's keys and gaptrack's. A ``tf_keras`` (Keras 2) model's ``fit`` is
    refused with :class:`gaptrack.keras3.Keras2ModelError` before it trains.

    Args:
        disable: ``True`` stops tracking (MLflow's patches, if any, stay).
        probe: data to measure on instead of ``fit``'s training data (e.g. for
            a generator): anything :class:`GapTracker` accepts as ``data``.
        probe_size, every, seed, bn_snapshots: as for :class:`GapTracker`.

    Example:
        >>> import gaptrack
        >>> gaptrack.autolog()
        >>> model.fit(x, y, epochs=5)           # tracked in the active MLflow run
        >>> gaptrack.autolog(disable=True)
    """
    if disable:
        for patch in _patches:
            patch.disable()
        return
    # refused here, not warned about inside fit (where a ProbeError means "cannot measure")
    if probe_size is not None:
        check_positive_int("probe_size", probe_size, ProbeError)
    check_positive_int("every", every)
    _settings.clear()
    _settings.update(probe=probe, probe_size=probe_size, every=every, seed=seed,
                     bn_snapshots=bn_snapshots)
    if not _patches:
        from gaptrack.keras_private import functional_class

        _patches.append(FitPatch(keras.Model, _callback_for,
                                 front=(keras.Sequential, functional_class())))
    legacy = _legacy_keras()
    if len(_patches) == 1 and legacy is not None:
        _patches.append(FitPatch(legacy.Model, _refuse))
    for patch in _patches:
        patch.enable()


def _legacy_keras():
    """The ``tf_keras`` module (Keras 2) when its models can be trained here: it
    is imported, or ``TF_USE_LEGACY_KERAS`` is set (TensorFlow's ``tf.keras`` is
    then ``tf_keras``) and it is installed; else ``None``."""
    legacy = os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true")
    if "tf_keras" not in sys.modules and not (legacy and importlib.util.find_spec("tf_keras")):
        return None
    return importlib.import_module("tf_keras")


def _refuse(arguments):
    require_keras3(arguments["self"], "gaptrack.autolog()")


def _callback_for(arguments):
    """The tracker for one ``fit`` call, unless it has one among its callbacks."""
    if any(isinstance(c, GapTracker) for c in arguments.get("callbacks") or ()):
        return None
    return _tracker_for(arguments)


def _tracker_for(arguments):
    """A GapTracker for one ``fit`` call's arguments; one that logs ``fit/*``
    only, after one :class:`ProbeWarning`, when there is nothing it can measure."""
    options = dict(_settings)
    probe = options.pop("probe")
    batch_size = arguments.get("batch_size")
    # fit's class weights weight fit's own data; a probe given to autolog is as given
    options["class_weight"] = arguments.get("class_weight") if probe is None else None
    try:
        if probe is None:
            probe, batch_size = _training_data(arguments, batch_size, options["probe_size"])
        return GapTracker(probe, batch_size=batch_size, **options)
    except ProbeError as exc:
        warnings.warn(
            f"gaptrack.autolog: {exc}; gaptrack logs fit/* and does not measure. Pass a "
            "probe, e.g. gaptrack.autolog(probe=(x_sample, y_sample)), to measure the gap",
            ProbeWarning, stacklevel=3)
        return GapTracker(None, batch_size=batch_size, **{**options, "class_weight": None})


def _training_data(arguments, batch_size, probe_size):
    """What the probe is drawn from, and the batch size to measure at.

    Raises:
        ProbeError: nothing can be measured on (a generator, a pipeline that
            cannot be copied, data without targets).
    """
    x = arguments.get("x")
    if _is_py_dataset(x):
        return x, batch_size
    if isinstance(x, collections.abc.Iterator):
        raise ProbeError(f"fit() was given a {type(x).__name__}, which only fit() can read "
                         "(once)")
    if _is_tf_dataset(x):
        import tensorflow as tf

        if int(x.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            return Probe.from_pipeline(x, arguments.get("steps_per_epoch"), probe_size), \
                batch_size
        return x, batch_size
    data = (x, arguments.get("y"), arguments.get("sample_weight"))
    if data[2] is None:
        data = data[:2]
    split = arguments.get("validation_split") or 0.0
    if split and arguments.get("validation_data") is None:
        from gaptrack.keras_private import train_validation_split

        data = train_validation_split(data, split)
    return data, batch_size or KERAS_DEFAULT_BATCH_SIZE
