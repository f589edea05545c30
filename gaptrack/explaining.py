"""``gaptrack.explain``: why ``fit()`` and ``evaluate()`` disagree, for the model
in front of you, right after ``fit()``; no MLflow.

It measures the model as it is (:mod:`gaptrack.measurement`: evaluate() on the
training data, the same weights in training mode, PreciseBN), and with ``fit()``'s
``History`` decomposes the last epoch's gap exactly as :class:`gaptrack.GapTracker`
does at that epoch (same probe, seed and passes, so the same numbers). Without a
history it says what can be known of the weights alone: what training mode gives
(fit()'s number without drift) and how much of its difference to evaluate() is
Dropout/batch statistics (``mode``) and stale BN moving averages (``bn_ema``).

Example:
    >>> h = model.fit(x, y, batch_size=1024, epochs=5)
    >>> gaptrack.explain(model, (x, y), batch_size=1024, history=h)   # displays in Jupyter
"""

import keras
from keras import tree

from gaptrack import keras_private
from gaptrack.decompose import add_measurement
from gaptrack.distribute import replication
from gaptrack.keras3 import require_keras3
from gaptrack.keys import BATCH_SIZE_TAG, PROBE_SIZE_TAG, REPLICAS_TAG
from gaptrack.measurement import Measurer
from gaptrack.probe import Probe, check_positive_int
from gaptrack.record import EpochRecord, RunHistory
from gaptrack.report import build_report

_HISTORY_FORMS = ("a keras.callbacks.History (what fit() returns), its .history dict "
                  "({name: [value per epoch]}) or one epoch's logs ({name: value})")


class ExplainError(ValueError):
    """The arguments of :func:`explain` cannot be used; the message names the
    value given and what is accepted."""


def explain(model, data, *, batch_size, history=None, probe_size=None, seed=0,
            inference_batch_size=None, class_weight=None, loss=None):
    """Why ``fit()`` and ``evaluate()`` disagree on ``data``, for ``model`` as it is.

    Args:
        model: a compiled Keras 3 model, typically right after ``fit()``.
        data: the training data, as given to ``fit``: ``(x, y)``, ``(x, y,
            sample_weight)``, a finite ``tf.data.Dataset`` or a
            :class:`gaptrack.probe.Probe`; larger than ``probe_size``, a seeded
            sample of it is measured.
        batch_size: ``fit``'s batch size (training mode and PreciseBN depend on
            it).
        history: what ``fit()`` reported: the ``History`` it returned, its
            ``.history`` dict, or one epoch's logs. Its last epoch is
            decomposed; without it, ``gap`` and ``drift`` are not known.
        probe_size: measure on at most this many samples (default 10,000).
        seed: seed of the probe sample and of the Dropout masks (the tracker's
            default, so the numbers are the tracker's).
        inference_batch_size: batch size of the inference passes.
        class_weight: ``fit``'s ``class_weight``, if it had one.
        loss: the loss of a model compiled without one (see
            :class:`gaptrack.measurement.Measurer`).

    Returns:
        A :class:`gaptrack.Report`.

    Raises:
        ExplainError: ``batch_size`` is not a positive integer, ``history`` is
            not one of the accepted forms or not this model's, or ``data`` does
            not fit the model's inputs; raised before anything is measured.
    """
    require_keras3(model, "gaptrack.explain()")
    batch_size = check_positive_int("batch_size", batch_size, ExplainError)
    fit, val, epoch = _fit_side(history, model)
    probe = Probe.from_data(data, probe_size=probe_size, seed=seed)
    if class_weight is not None:
        probe = probe.with_class_weight(class_weight)
    _check_inputs(model, probe)
    measurer = Measurer(model, batch_size, seed=seed,
                        inference_batch_size=inference_batch_size, loss=loss)
    if fit is not None:
        keras_private.ensure_built(model, next(probe.batches(batch_size)))
        _check_names(fit, keras_private.metric_names(model, measurer.loss), model)
    record = EpochRecord(step=epoch, fit=fit or {}, val=val)
    add_measurement(record, measurer.measure(probe), fit_known=fit is not None)
    tags = {PROBE_SIZE_TAG: str(probe.size), BATCH_SIZE_TAG: str(batch_size),
            REPLICAS_TAG: str(replication(model).replicas)}
    return build_report(RunHistory(run_id=None, run_name=None, records=[record], tags=tags))


def _fit_side(history, model):
    """``(fit, val, epoch)`` of the last epoch of ``history``: ``{name: value}``
    without and with the ``val_`` prefix, and the epoch's index (``None`` for one
    epoch's logs); ``(None, {}, None)`` without a history."""
    if history is None:
        return None, {}, None
    epochs = None
    if isinstance(history, keras.callbacks.History):
        if history.model is not None and history.model is not model:
            raise ExplainError(
                f"history is the History of model {history.model.name!r}, not of model "
                f"{model.name!r}: pass the History that fit() returned for this model")
        epochs = list(getattr(history, "epoch", []) or [])
        history = history.history
    if not isinstance(history, dict) or not history:
        raise ExplainError(f"history must be {_HISTORY_FORMS}; got {_describe(history)}")
    logs = {}
    for name, value in history.items():
        if isinstance(value, (list, tuple)):
            if not value:
                raise ExplainError(f"history[{name!r}] is empty: fit() ran no epoch")
            epochs = epochs or list(range(len(value)))
            value = value[-1]
        try:
            logs[name] = float(value)
        except (TypeError, ValueError):
            raise ExplainError(f"history[{name!r}] must be a number or a list of numbers, one "
                               f"per epoch; got {_describe(value)}") from None
    fit = {k: v for k, v in logs.items() if not k.startswith("val_")}
    val = {k[len("val_"):]: v for k, v in logs.items() if k.startswith("val_")}
    return fit, val, (epochs[-1] if epochs else None)


def _check_names(fit, names, model):
    """Refuse a history that lacks a metric the model reports (another model's)."""
    missing = [name for name in names if name not in fit]
    if missing:
        raise ExplainError(
            f"history holds {sorted(fit)}, but model {model.name!r} reports {names} "
            f"(missing: {missing}): it is the history of another model, or of this model "
            "compiled with other metrics; pass the History that fit() returned for it")


def _check_inputs(model, probe):
    """Refuse data whose samples do not have the shapes of the model's inputs
    (when the model declares them: functional and Sequential models with an
    ``Input``)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # subclassed; Sequential without an Input
        return
    if not inputs:
        return
    given = [tuple(a.shape[1:]) for a in tree.flatten(probe.x)]
    wanted = [tuple(t.shape[1:]) for t in inputs]
    fits = len(given) == len(wanted) and all(
        len(g) == len(w) and all(d is None or d == e for d, e in zip(w, g))
        for g, w in zip(given, wanted))
    if not fits:
        raise ExplainError(
            f"data's samples have shape {_shapes(given)}, but model {model.name!r} takes "
            f"inputs of shape {_shapes(wanted)} (None: any size); pass the training data "
            "the model was fit on")


def _shapes(shapes):
    text = ", ".join(str(s) for s in shapes)
    return text if len(shapes) == 1 else f"[{text}]"


def _describe(value):
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"
