"""Why ``fit()`` and ``evaluate()`` disagree, in one word and its evidence.

:func:`diagnose` reads a run's logged history (:mod:`gaptrack.decompose`'s
``gap/<m>`` and its parts, ``fit/<m>``, ``eval_train/<m>``, ``noise/loss``) and
returns a :class:`Diagnosis`, whose ``cause`` is the tag ``gaptrack.diagnosis``:

- ``drift``, ``mode`` or ``bn_ema``: the part of the gap with the largest
  magnitude at the last measured epoch;
- ``none``: fit and evaluate agree within the noise of the measurement (below);
- ``nonfinite``: the loss was NaN or infinite at some epoch (the first one is
  the tag ``gaptrack.nonfinite_epoch``): the run diverged, or its data holds
  NaN/inf, and a gap of NaNs has no parts to rank.

**Which metric decides.** The loss: it is what ``fit()`` minimises, every
compiled model has it, and it moves continuously where accuracy moves in steps
of ``1/n`` and stays flat. Other metrics can be diagnosed the same way
(``metric=``); the report shows them beside the loss.

**Noise.** Every number compared is a mean over the ``n`` samples of the probe,
so it comes with a standard error (SE), the error bar of the number:

- loss: ``SE = s / sqrt(n)``, ``s`` the standard deviation (Bessel-corrected) of
  the per-sample losses of ``evaluate()`` on the probe, which the tracker
  measures every epoch and logs as ``noise/loss``;
- accuracy (a metric named ``accuracy``, ``*_accuracy`` or ``acc``, with its
  value ``p`` in [0, 1]): each sample is right or wrong, so binomially
  ``SE = sqrt(p (1 - p) / n)``, ``p = eval_train/<m>``, ``n`` the probe size
  (tag ``gaptrack.probe_size``).

The diagnosis is ``none`` when the gap *and each of its parts* are within
``z * SE``, ``z = 1``: fit and evaluate agree to within the error bar of
evaluate's own number, and not because two real effects cancel (stale BN
statistics offsetting Dropout can leave a small gap; that is diagnosed by its
largest part, not as ``none``). Why one SE and not two (a 95% test): SE is the
uncertainty of the loss as an estimate from ``n`` samples, not a test of the
gap, which fit and evaluate measure on the same samples: a gap below it is one
that another draw of ``n`` training samples could hide, the resolution of the
measurement. Without an SE (another metric; a multi-output model, whose
per-sample loss Keras does not define) only a gap of exactly 0 is ``none``.

Example:
    >>> history = {"fit/loss": {0: 0.9, 1: 0.5}, "eval_train/loss": {0: 0.6, 1: 0.25},
    ...            "gap/loss": {0: 0.3, 1: 0.25}, "gap/loss/drift": {0: 0.2, 1: 0.2},
    ...            "gap/loss/mode": {0: 0.1, 1: 0.05}, "gap/loss/bn_ema": {0: 0.0, 1: 0.0},
    ...            "noise/loss": {0: 0.04, 1: 0.03}}
    >>> d = diagnose(history)
    >>> d.cause, d.epoch, d.threshold
    ('drift', 1, 0.03)
"""

import math
from dataclasses import dataclass

from gaptrack.decompose import PARTS

CAUSES = PARTS + ("none", "nonfinite")
#: Error bars: the gap is ``none`` within ``Z`` standard errors.
Z = 1.0
DIAGNOSIS_TAG = "gaptrack.diagnosis"
NONFINITE_TAG = "gaptrack.nonfinite_epoch"


class DiagnosisError(ValueError):
    """The history has nothing to diagnose; the message says what is missing."""


@dataclass(frozen=True)
class Diagnosis:
    """The dominant cause of the gap of one metric, and the numbers behind it.

    Attributes:
        cause: one of :data:`CAUSES` (the tag ``gaptrack.diagnosis``).
        metric: the metric diagnosed (``"loss"``).
        epoch: the epoch judged: the last measured one, or for ``nonfinite``
            the first epoch with a non-finite value.
        fit, eval_train, gap: ``fit/<m>``, ``eval_train/<m>`` and ``gap/<m>`` at
            ``epoch`` (NaN where not logged, e.g. an epoch that was not measured).
        parts: ``{"drift": ..., "mode": ..., "bn_ema": ...}`` at ``epoch``.
        noise: the standard error of the metric at ``epoch`` (see the module
            docstring), ``None`` when it has none.
        z: the gap is ``none`` within ``z * noise``.
        probe_size: ``n``, the samples measured (``None`` when unknown).
        first_nonfinite_epoch: the first epoch with a NaN or infinite value of
            the metric, else ``None``.
    """

    cause: str
    metric: str
    epoch: int
    fit: float
    eval_train: float
    gap: float
    parts: dict
    noise: float = None
    z: float = Z
    probe_size: int = None
    first_nonfinite_epoch: int = None

    @property
    def threshold(self):
        """``z * noise``, the largest magnitude that is within noise (0 without noise)."""
        return 0.0 if self.noise is None else self.z * self.noise

    @property
    def dominant(self):
        """The part with the largest magnitude (also when the cause is ``none``)."""
        return max(PARTS, key=lambda part: abs(self.parts[part]))

    @property
    def tags(self):
        """The run tags: ``gaptrack.diagnosis`` and, for a diverged run,
        ``gaptrack.nonfinite_epoch``."""
        tags = {DIAGNOSIS_TAG: self.cause}
        if self.first_nonfinite_epoch is not None:
            tags[NONFINITE_TAG] = str(self.first_nonfinite_epoch)
        return tags

    def __str__(self):
        return self.cause


def is_accuracy(metric):
    """Whether ``metric`` (as Keras names it) is a fraction of correct samples."""
    return metric == "acc" or metric == "accuracy" or metric.endswith("_accuracy")


def standard_error(history, metric, epoch, probe_size=None):
    """The standard error of ``eval_train/<metric>`` at ``epoch``, or ``None``.

    ``noise/loss`` for the loss; ``sqrt(p (1 - p) / n)`` for an accuracy ``p``
    in [0, 1] on ``n = probe_size`` samples; ``None`` otherwise.
    """
    if metric == "loss":
        value = history.get("noise/loss", {}).get(epoch)
        return None if value is None else float(value)
    p = history.get(f"eval_train/{metric}", {}).get(epoch)
    if is_accuracy(metric) and probe_size and p is not None and 0.0 <= p <= 1.0:
        return math.sqrt(p * (1.0 - p) / probe_size)
    return None


def first_nonfinite_epoch(history, metric="loss"):
    """The first epoch at which ``fit/<metric>``, ``gap/<metric>`` or a part is
    NaN or infinite, else ``None``.

    Those keys see all four measurements (a part is a difference of two of
    them), and ``fit/<m>`` also the epochs that were not measured.
    """
    keys = [f"fit/{metric}", f"gap/{metric}", *(f"gap/{metric}/{p}" for p in PARTS)]
    bad = [step for key in keys for step, value in history.get(key, {}).items()
           if not math.isfinite(value)]
    return min(bad) if bad else None


def diagnose(history, metric="loss", *, probe_size=None, z=Z):
    """Diagnose the gap of ``metric`` from a run's logged history.

    Args:
        history: ``{key: {epoch: value}}`` as the tracker logged it (what
            :func:`gaptrack.report.load_history` reads back): ``gap/<m>``,
            ``gap/<m>/{drift,mode,bn_ema}``, ``fit/<m>``, ``eval_train/<m>``
            and, for the loss, ``noise/loss``.
        metric: the metric diagnosed; the loss by default (see the module
            docstring).
        probe_size: ``n``, for the binomial error of an accuracy.
        z: within how many standard errors a gap is ``none``.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        DiagnosisError: no epoch was measured (``gap/<metric>`` is missing).
    """
    gaps = history.get(f"gap/{metric}")
    if not gaps:
        measured = sorted(k[len("gap/"):] for k in history
                          if k.startswith("gap/") and f"{k}/drift" in history)
        raise DiagnosisError(f"no gap/{metric} in the history: nothing was measured for "
                             f"{metric!r}; measured metrics: {', '.join(measured) or '(none)'}")
    first = first_nonfinite_epoch(history, metric)
    epoch = max(gaps) if first is None else first

    def at(key):
        return float(history.get(key, {}).get(epoch, math.nan))

    parts = {part: at(f"gap/{metric}/{part}") for part in PARTS}
    gap = at(f"gap/{metric}")
    noise = standard_error(history, metric, epoch, probe_size)
    if first is not None:
        cause = "nonfinite"
    elif max(abs(gap), *(abs(v) for v in parts.values())) <= (0.0 if noise is None else z * noise):
        cause = "none"
    else:
        cause = max(PARTS, key=lambda part: abs(parts[part]))
    return Diagnosis(cause=cause, metric=metric, epoch=epoch, fit=at(f"fit/{metric}"),
                     eval_train=at(f"eval_train/{metric}"), gap=gap, parts=parts,
                     noise=noise, z=z, probe_size=probe_size, first_nonfinite_epoch=first)
