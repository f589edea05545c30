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
"""

import math

PARTS = ("drift", "mode", "bn_ema")
SUMMARIES = ("final", "max_abs", "mean_abs")


def decompose(fit, eval_train, train_mode, precise_bn=None):
    """The SPEC keys ``gap/<m>`` and ``gap/<m>/<part>`` for every metric measured
    by both sides.

    Args:
        fit: ``{metric: value}`` as ``fit()`` reported it (``val_`` keys ignored).
        eval_train, train_mode, precise_bn: ``{metric: value}`` measurements;
            ``precise_bn`` is ``None`` when no BN layer trains.

    Example:
        >>> decompose({"loss": 0.5}, {"loss": 0.75}, {"loss": 0.625}, {"loss": 0.6875})
        {'gap/loss': -0.25, 'gap/loss/drift': -0.125, 'gap/loss/mode': -0.0625, 'gap/loss/bn_ema': -0.0625}
    """
    out = {}
    for name, e in eval_train.items():
        if name not in fit or name not in train_mode:
            continue
        f, e, t = float(fit[name]), float(e), float(train_mode[name])
        p = float(precise_bn[name]) if precise_bn and name in precise_bn else None
        out[f"gap/{name}"] = f - e
        out[f"gap/{name}/drift"] = f - t
        out[f"gap/{name}/mode"] = t - (e if p is None else p)
        out[f"gap/{name}/bn_ema"] = 0.0 if p is None else p - e
    return out


def summarize(history):
    """Run-level summary keys from the per-epoch gaps.

    Args:
        history: ``{metric: [gap at each measured epoch, in order]}``.

    Returns:
        ``{"gap_final/<m>": last, "gap_max_abs/<m>": max |gap|,
        "gap_mean_abs/<m>": mean |gap|}``; non-finite gaps are skipped by the
        max and mean (and reported as such by ``gap_final``).

    Example:
        >>> summarize({"loss": [0.1, -0.3]})
        {'gap_final/loss': -0.3, 'gap_max_abs/loss': 0.3, 'gap_mean_abs/loss': 0.2}
    """
    out = {}
    for name, gaps in history.items():
        if not gaps:
            continue
        finite = [abs(g) for g in gaps if math.isfinite(g)]
        out[f"gap_final/{name}"] = gaps[-1]
        out[f"gap_max_abs/{name}"] = max(finite) if finite else math.nan
        out[f"gap_mean_abs/{name}"] = sum(finite) / len(finite) if finite else math.nan
    return out


def gap_history(decompositions):
    """``{metric: [gap, ...]}`` from a list of :func:`decompose` results.

    ``gap/<m>/<part>`` is a part only when ``gap/<m>`` is a key too, so metrics
    named ``drift`` or ``out/mode`` keep their gaps.
    """
    history = {}
    for parts in decompositions:
        for key, value in parts.items():
            head, _, tail = key.rpartition("/")
            if key.startswith("gap/") and not (tail in PARTS and head in parts):
                history.setdefault(key[len("gap/"):], []).append(value)
    return history
