"""Why ``fit()`` and ``evaluate()`` disagree, in one word and its evidence.

:func:`diagnose` reads a run's history (its measured
records, :class:`gaptrack.record.EpochRecord`: the gap and its parts, ``fit``,
``eval_train``, the loss's noise) and returns a :class:`Diagnosis`, whose ``cause`` is the tag ``gaptrack.diagnosis``:

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
    >>> from gaptrack.record import EpochRecord, Parts
    >>> records = [EpochRecord(0, fit={"loss": 0.9}, eval_train={"loss": 0.6}, noise=0.04,
    ...                        parts={"loss": Parts(0.3, 0.2, 0.1, 0.0)}),
    ...            EpochRecord(1, fit={"loss": 0.5}, eval_train={"loss": 0.25}, noise=0.03,
    ...                        parts={"loss": Parts(0.25, 0.2, 0.05, 0.0)})]
    >>> d = diagnose(records)
    >>> d.cause, d.epoch, d.threshold
    ('drift', 1, 0.03)
"""

import dataclasses
import math
from dataclasses import dataclass

from gaptrack.keys import PARTS

#: Error bars: the gap is ``none`` within ``Z`` standard errors.
Z = 1.0


class DiagnosisError(ValueError):
    """The history has nothing to diagnose; the message says what is missing."""


@dataclass(frozen=True)
class Diagnosis:
    """The dominant cause of the gap of one metric, and the numbers behind it.

    Attributes:
        cause: ``drift``, ``mode``, ``bn_ema``, ``none`` or ``nonfinite`` (the
            tag ``gaptrack.diagnosis``).
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
        fit_known: whether ``fit()``'s value was given; without it (a model
            measured with no ``History``) ``fit``, ``gap`` and ``drift`` are NaN
            and the cause is the larger of ``mode`` and ``bn_ema``.
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
    fit_known: bool = True

    @property
    def threshold(self):
        """``z * noise``, the largest magnitude that is within noise (0 without noise)."""
        return 0.0 if self.noise is None else self.z * self.noise

    def __str__(self):
        return self.cause


def is_accuracy(metric):
    """Whether ``metric`` (as Keras names it) is a fraction of correct samples."""
    return metric == "acc" or metric == "accuracy" or metric.endswith("_accuracy")


def standard_error(record, metric, probe_size=None):
    """The standard error of ``eval_train[metric]`` of one record, or ``None``.

    The logged noise for the loss; ``sqrt(p (1 - p) / n)`` for an accuracy ``p``
    in [0, 1] on ``n = probe_size`` samples; ``None`` otherwise.
    """
    if metric == "loss":
        return record.noise
    p = record.eval_train.get(metric)
    if is_accuracy(metric) and probe_size and p is not None and 0.0 <= p <= 1.0:
        return math.sqrt(p * (1.0 - p) / probe_size)
    return None


def first_nonfinite_epoch(records, metric="loss"):
    """The first step at which ``fit``, the gap or a part of ``metric`` is NaN or
    infinite, else ``None``.

    These see all four measurements (a part is a difference of two of them), and
    ``fit`` also the epochs that were not measured.
    """
    bad = [r.step for r in records
           if not math.isfinite(r.fit.get(metric, 0.0))
           or (metric in r.parts and not all(map(math.isfinite, _known_parts(r, metric))))]
    return min(bad) if bad else None


def _known_parts(record, metric):
    """The gap and parts of ``metric`` that ``record`` knows: without a ``fit``
    value, ``mode`` and ``bn_ema`` only."""
    parts = record.parts[metric]
    if metric in record.fit:
        return dataclasses.astuple(parts)
    return parts.mode, parts.bn_ema


def diagnose(records, metric="loss", *, probe_size=None, z=Z):
    """Diagnose the gap of ``metric`` from a run's records.

    Args:
        records: ``[EpochRecord]`` in step order, as the tracker keeps them (or
            :func:`gaptrack.keys.parse_records` reads them back).
        metric: the metric diagnosed; the loss by default (see the module
            docstring).
        probe_size: ``n``, for the binomial error of an accuracy.
        z: within how many standard errors a gap is ``none``.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        DiagnosisError: no epoch was measured for ``metric``.
    """
    measured = [r for r in records if metric in r.parts]
    if not measured:
        names = sorted({m for r in records for m in r.parts})
        raise DiagnosisError(f"no gap of {metric!r} in the history: nothing was measured for "
                             f"{metric!r}; measured metrics: {', '.join(names) or '(none)'}")
    first = first_nonfinite_epoch(records, metric)
    record = measured[-1] if first is None else next(r for r in records if r.step == first)
    nan = math.nan
    split = record.parts.get(metric)
    parts = {p: nan if split is None else getattr(split, p) for p in PARTS}
    gap = nan if split is None else split.gap
    noise = standard_error(record, metric, probe_size)
    fit_known = metric in record.fit
    candidates = PARTS if fit_known else ("mode", "bn_ema")
    known = [abs(v) for v in _known_parts(record, metric)] if split is not None else [nan]
    if first is not None:
        cause = "nonfinite"
    elif max(known) <= (0.0 if noise is None else z * noise):
        cause = "none"
    else:
        cause = max(candidates, key=lambda part: abs(parts[part]))
    return Diagnosis(cause=cause, metric=metric, epoch=record.step,
                     fit=float(record.fit.get(metric, nan)),
                     eval_train=float(record.eval_train.get(metric, nan)), gap=gap, parts=parts,
                     noise=noise, z=z, probe_size=probe_size, first_nonfinite_epoch=first,
                     fit_known=fit_known)
