"""The gap between ``fit()`` and ``evaluate()``, split into its causes.

Pure arithmetic on the numbers :mod:`gaptrack.measurement` produces; no Keras, no
MLflow. For a metric ``m`` at one epoch, with ``fit`` what ``fit()`` reported,
``eval`` inference on the training data, ``train`` the training-mode
re-measurement and ``pbn`` the PreciseBN one::

    gap    = fit   - eval
    drift  = fit   - train   fit averages over the epoch's batches, each taken
                             before that batch's update; train uses the weights
                             at epoch end
    mode   = train - pbn     Dropout on and BN batch statistics vs inference
                             mode with accurate BN statistics
    bn_ema = pbn   - eval    accurate BN statistics vs the (stale) moving averages

Without a BN layer that trains, ``pbn`` is ``eval``: ``mode = train - eval`` and
``bn_ema = 0``. The parts are a telescoping sum, so ``drift + mode + bn_ema ==
gap`` up to floating point rounding, whatever the numbers.

Without ``fit`` (a model measured after training, with no ``History`` at hand)
``mode`` and ``bn_ema`` are still known; ``gap`` and ``drift`` are NaN.
"""

import math

from gaptrack.record import Parts


def decompose(fit, eval_train, train_mode, precise_bn=None):
    """The gap of every metric measured by both sides, and its parts.

    Args:
        fit: ``{metric: value}`` as ``fit()`` reported it, or ``None`` when
            unknown: then every measured metric gets NaN ``gap`` and ``drift``.
        eval_train, train_mode, precise_bn: ``{metric: value}`` measurements;
            ``precise_bn`` is ``None`` (or empty) when no BN layer trains.

    Returns:
        ``{metric: Parts}``.

    Example:
        >>> decompose({"loss": 0.5}, {"loss": 0.75}, {"loss": 0.625}, {"loss": 0.6875})
        {'loss': Parts(gap=-0.25, drift=-0.125, mode=-0.0625, bn_ema=-0.0625)}
        >>> decompose(None, {"loss": 0.75}, {"loss": 0.625}, {"loss": 0.6875})
        {'loss': Parts(gap=nan, drift=nan, mode=-0.0625, bn_ema=-0.0625)}
    """
    out = {}
    for name, e in eval_train.items():
        if (fit is not None and name not in fit) or name not in train_mode:
            continue
        f = math.nan if fit is None else float(fit[name])
        e, t = float(e), float(train_mode[name])
        p = float(precise_bn[name]) if precise_bn and name in precise_bn else None
        out[name] = Parts(gap=f - e, drift=f - t, mode=t - (e if p is None else p),
                          bn_ema=0.0 if p is None else p - e)
    return out


def summarize(records):
    """Run-level summaries of the gaps of the measured epochs.

    Args:
        records: ``[EpochRecord]`` in step order.

    Returns:
        ``{metric: {"final": last gap, "max_abs": max |gap|, "mean_abs": mean
        |gap|}}``; non-finite gaps are skipped by the max and mean (and
        reported as such by ``final``).

    Example:
        >>> from gaptrack.record import EpochRecord
        >>> summarize([EpochRecord(0, parts={"loss": Parts(0.1, 0.1, 0, 0)}),
        ...            EpochRecord(1, parts={"loss": Parts(-0.3, -0.3, 0, 0)})])
        {'loss': {'final': -0.3, 'max_abs': 0.3, 'mean_abs': 0.2}}
    """
    history = {}
    for record in records:
        for name, parts in record.parts.items():
            history.setdefault(name, []).append(parts.gap)
    out = {}
    for name, gaps in history.items():
        finite = [abs(g) for g in gaps if math.isfinite(g)]
        out[name] = {
            "final": gaps[-1],
            "max_abs": max(finite) if finite else math.nan,
            "mean_abs": sum(finite) / len(finite) if finite else math.nan,
        }
    return out


def add_measurement(record, measurement, fit_known=True):
    """Fill ``record`` (:class:`gaptrack.record.EpochRecord`) with one
    :class:`gaptrack.measurement.Measurement` and the gap it decomposes against
    ``record.fit``; with ``fit_known=False`` (no ``History``), the parts that
    need no ``fit`` value."""
    record.eval_train = measurement.eval_train
    record.train_mode = measurement.train_mode
    record.precise_bn = measurement.precise_bn or {}
    record.parts = decompose(record.fit if fit_known else None, measurement.eval_train,
                             measurement.train_mode, measurement.precise_bn)
    record.noise = measurement.loss_standard_error
    record.bn_spread = measurement.bn_spread
    record.staleness = {stats.key: stats.staleness for stats in measurement.bn
                        if all(math.isfinite(v) for v in stats.mean)}
