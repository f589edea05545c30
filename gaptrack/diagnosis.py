"""Which cause explains the gap: ``drift``, ``mode``, ``bn_ema`` or ``none``.

The diagnosis looks at the loss at the last measured epoch: the part of the
decomposition (:mod:`gaptrack.decompose`) with the largest magnitude is the
dominant cause. ``none`` when the gap is within ``noise``; ``nonfinite`` when a
loss was NaN or infinite at some epoch.
"""

import math

from gaptrack.decompose import PARTS

DIAGNOSES = PARTS + ("none", "nonfinite")


def diagnose(parts, history=None, metric="loss", noise=0.0):
    """The dominant cause of the gap of ``metric``.

    Args:
        parts: one epoch's :func:`gaptrack.decompose.decompose` result.
        history: ``{metric: [gap, ...]}`` over the run; a non-finite gap at any
            epoch gives ``nonfinite``.
        metric: the metric to diagnose.
        noise: gaps of at most this magnitude are ``none``.

    Example:
        >>> diagnose({"gap/loss": 0.3, "gap/loss/drift": 0.25,
        ...           "gap/loss/mode": 0.05, "gap/loss/bn_ema": 0.0})
        'drift'
    """
    gaps = (history or {}).get(metric, [])
    gap = parts.get(f"gap/{metric}")
    if gap is None:
        return "none"
    if not math.isfinite(gap) or not all(math.isfinite(g) for g in gaps):
        return "nonfinite"
    if abs(gap) <= noise:
        return "none"
    return max(PARTS, key=lambda part: abs(parts[f"gap/{metric}/{part}"]))
