"""One measured epoch as one typed record: what the tracker keeps, logs and
reports, and what reading a run back from MLflow gives again.

The data flows one way: a :class:`gaptrack.measurement.Measurement` and the
epoch's ``fit()`` logs make an :class:`EpochRecord` (with the gap decomposed by
:mod:`gaptrack.decompose`); :mod:`gaptrack.keys` turns it into MLflow keys at the
logging edge, and parses the keys back into records for a report rebuilt from
the server.
"""

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Parts:
    """The gap of one metric at one epoch and its causes:
    ``gap == drift + mode + bn_ema`` (see :mod:`gaptrack.decompose`)."""

    gap: float
    drift: float
    mode: float
    bn_ema: float


@dataclass
class EpochRecord:
    """Everything logged at one step (epoch, or iteration of a custom loop).

    Attributes:
        step: the MLflow step.
        fit, val: ``{metric: value}`` as ``fit()`` reported them.
        eval_train, train_mode, precise_bn: the measurements (empty when the
            epoch was not measured; ``precise_bn`` empty without a BN layer that
            trains).
        returned: ``eval_train`` of the weights ``fit()`` returned, when they
            differ from the last measured epoch's (only on the last record).
        parts: ``{metric: Parts}``.
        noise: the standard error of ``eval_train["loss"]``, or ``None``.
        staleness: ``{layer key: (mean, var)}`` per BN layer (:mod:`gaptrack.bn`).
        bn_spread: spread of BN moving statistics across replicas, or ``None``.
    """

    step: int
    fit: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    eval_train: dict = field(default_factory=dict)
    train_mode: dict = field(default_factory=dict)
    precise_bn: dict = field(default_factory=dict)
    returned: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    noise: float = None
    staleness: dict = field(default_factory=dict)
    bn_spread: float = None

    @property
    def measured(self):
        """Whether the measurements ran at this step."""
        return bool(self.eval_train)


@dataclass
class RunHistory:
    """A run as the report reads it.

    Attributes:
        run_id, run_name: the run.
        records: ``[EpochRecord]`` by step.
        tags: the run's tags.
    """

    run_id: str
    run_name: str
    records: list
    tags: dict

    @property
    def measured(self):
        """The records of the measured epochs."""
        return [r for r in self.records if r.parts]

    @property
    def names(self):
        """The measured metrics, the loss first."""
        return loss_first({m for r in self.records for m in r.parts})


def natural_order(names):
    """Names sorted with their numbers as numbers (``bn_2`` before ``bn_10``)."""
    return sorted(names, key=lambda name: [int(t) if t.isdigit() else t
                                           for t in re.split(r"(\d+)", name)])


def loss_first(names):
    """Metric names sorted, the loss first."""
    return sorted(names, key=lambda m: (m != "loss", m))
