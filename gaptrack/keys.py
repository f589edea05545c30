"""Every name gaptrack writes to MLflow, spelled once, and parsed back here.

The namespace (SPEC "Per-epoch measurements"), at step = epoch (0-based), for
every compiled metric ``m`` as Keras names it (``loss``, ``accuracy``,
``out/accuracy``...):

=================================  ==============================================
``fit/<m>``, ``val/<m>``           what ``fit()`` reported (``val_`` logs)
``eval_train/<m>``                 inference mode on the probe: ``evaluate()``
``train_mode/<m>``                 training mode on the probe, no state changed
``precise_bn/<m>``                 inference with recalibrated BN statistics
``returned/<m>``                   ``eval_train`` of the weights ``fit()`` returned,
                                   when they are not the last measured epoch's
``gap/<m>``                        ``fit - eval_train``
``gap/<m>/<part>``                 its parts: ``drift``, ``mode``, ``bn_ema``
``noise/loss``                     standard error of ``eval_train/loss``
``staleness/mean/<layer>``,        per BN layer (``<layer>``: its unique path,
``staleness/var/<layer>``          ``/`` written as ``.``), see :mod:`gaptrack.bn`
``replicas/bn_spread``             BN moving statistics' spread across replicas
=================================  ==============================================

Once at train end (step 0): ``gap_final/<m>``, ``gap_max_abs/<m>``,
``gap_mean_abs/<m>``, ``staleness/worst/mean``, ``staleness/worst/var``.

The MLflow UI groups a run's charts into sections by the part of the key before
its last ``/`` and sorts the sections alphabetically: ``eval_train``, ``fit``,
``gap``, ``gap/loss``, ..., then ``staleness/mean`` and ``staleness/var`` (two
sections, whatever the model's depth).

Numbers become key strings only in :func:`epoch_metrics` and
:func:`summary_metrics`, and key strings become numbers again only in
:func:`parse_records`; no other module writes a key.
"""

import math
import re

from gaptrack.record import EpochRecord, Parts, loss_first

FIT, VAL = "fit", "val"
EVAL_TRAIN, TRAIN_MODE, PRECISE_BN = "eval_train", "train_mode", "precise_bn"
RETURNED = "returned"
GAP = "gap"
#: The causes of the gap, in the order of the telescoping sum.
PARTS = ("drift", "mode", "bn_ema")
#: Run-level summaries of the gap (``gap_<summary>/<m>``).
SUMMARIES = ("final", "max_abs", "mean_abs")
NOISE_LOSS = "noise/loss"
STALENESS = "staleness"
#: The two staleness statistics of a BN layer (see :mod:`gaptrack.bn`).
STALENESS_STATS = ("mean", "var")
WORST = "worst"
BN_SPREAD = "replicas/bn_spread"

# -- tags -------------------------------------------------------------------------
#: Marks a run as tracked by gaptrack; its value is the version.
VERSION_TAG = "gaptrack.version"
DIAGNOSIS_TAG = "gaptrack.diagnosis"
NONFINITE_TAG = "gaptrack.nonfinite_epoch"
PROBE_SIZE_TAG = "gaptrack.probe_size"
#: How the probe was drawn, when it is one draw of a pipeline (:attr:`gaptrack.probe.Probe.origin`).
PROBE_ORIGIN_TAG = "gaptrack.probe_origin"
BATCH_SIZE_TAG = "gaptrack.batch_size"
REPLICAS_TAG = "gaptrack.replicas"
WORST_LAYER_TAG = "gaptrack.bn_worst_layer"
RETURNED_TAG = "gaptrack.returned_weights"
#: What failed inside the tracker while training went on (:mod:`gaptrack.safety`).
ERROR_TAG = "gaptrack.error"
#: The last epoch a killed training logged (set by ``gaptrack sync``, which ends
#: the run as ``KILLED``); ``none`` when it logged none.
LAST_EPOCH_TAG = "gaptrack.last_epoch"
#: Marks a run that holds a comparison of other runs (not ranked, not counted).
REPORT_TAG = "gaptrack.report"
#: A fingerprint of the run description gaptrack wrote (MLflow's own tag
#: ``mlflow.note.content`` shows it on the run's Overview): a description the
#: user wrote has another one, and is never overwritten.
DESCRIPTION_TAG = "gaptrack.description"

# -- artifacts --------------------------------------------------------------------
REPORT_DIR = "gaptrack/report"
SNAPSHOT_DIR = "gaptrack/bn_snapshots"
REPORT_FILES = ("report.html", "report.md")
DECOMPOSITION_PNG, STALENESS_PNG = "decomposition.png", "bn_staleness.png"
#: The artifacts of a comparison run (:func:`gaptrack.compare.log_comparison`).
RANKING_TABLE, RANKING_PAGE, GAP_CURVES = "ranking.csv", "ranking.html", "gap_curves.png"
#: ``mlflow.log_image`` keys of the per-epoch charts.
DECOMPOSITION_IMAGE = "gaptrack.decomposition"
STALENESS_IMAGE = "gaptrack.bn_staleness"


def snapshot_path(epoch):
    """The artifact path of one epoch's BN snapshot table."""
    return f"{SNAPSHOT_DIR}/epoch_{epoch:05d}.parquet"


#: Characters MLflow accepts in a metric key besides letters and digits.
_KEY_INVALID = re.compile(r"[^A-Za-z0-9_\-.: ]")


def layer_key(path, taken):
    """A BN layer's path (``outer/inner/bn``) as the ``<layer>`` of its keys
    (``outer.inner.bn``): characters MLflow refuses become ``_``, and a key
    already in ``taken`` gets ``:2``, ``:3``... (``taken`` is updated)."""
    key = _KEY_INVALID.sub("_", path.replace("/", ".")).strip(".") or "_"
    key = re.sub(r"\.{2,}", ".", key)
    candidate, n = key, 1
    while candidate in taken:
        n += 1
        candidate = f"{key}:{n}"
    taken.add(candidate)
    return candidate


def metric_key(kind, metric):
    """``<kind>/<metric>``: kind is one of fit, val, eval_train, ..., gap."""
    return f"{kind}/{metric}"


def part_key(metric, part):
    return f"{GAP}/{metric}/{part}"


def summary_key(summary, metric):
    return f"{GAP}_{summary}/{metric}"


def staleness_key(stat, layer):
    return f"{STALENESS}/{stat}/{layer}"


def epoch_metrics(record):
    """``{key: value}`` of one :class:`gaptrack.record.EpochRecord`."""
    out = {metric_key(FIT, m): v for m, v in record.fit.items()}
    out.update((metric_key(VAL, m), v) for m, v in record.val.items())
    for kind in (EVAL_TRAIN, TRAIN_MODE, PRECISE_BN, RETURNED):
        out.update((metric_key(kind, m), v) for m, v in getattr(record, kind).items())
    for m, parts in record.parts.items():
        out[metric_key(GAP, m)] = parts.gap
        out.update((part_key(m, p), getattr(parts, p)) for p in PARTS)
    if record.noise is not None:
        out[NOISE_LOSS] = record.noise
    for layer, lags in record.staleness.items():
        out.update((staleness_key(s, layer), v) for s, v in zip(STALENESS_STATS, lags))
    if record.bn_spread is not None:
        out[BN_SPREAD] = record.bn_spread
    return out


def records_frame(records):
    """``[EpochRecord]`` as a DataFrame of keys: one row a record (index
    ``epoch``, the step), one column a key of :func:`epoch_metrics`, sorted
    (NaN where a record has no value for it)."""
    import pandas as pd

    frame = pd.DataFrame([epoch_metrics(r) for r in records],
                         index=pd.Index([r.step for r in records], name="epoch", dtype="int64"),
                         dtype="float64")
    return frame[sorted(frame.columns)]


def summary_metrics(summaries, worst_staleness=None):
    """The run-level keys.

    Args:
        summaries: ``{metric: {summary: value}}`` (:func:`gaptrack.decompose.summarize`).
        worst_staleness: ``(mean, var)`` of the stalest BN layer, or ``None``.
    """
    out = {summary_key(s, m): v for m, values in summaries.items() for s, v in values.items()}
    if worst_staleness is not None:
        out.update((staleness_key(WORST, s), v) for s, v in zip(STALENESS_STATS, worst_staleness))
    return out


def diagnosis_tags(diagnosis):
    """The run tags of a :class:`gaptrack.diagnosis.Diagnosis`: the cause and,
    for a diverged run, the first non-finite epoch."""
    tags = {DIAGNOSIS_TAG: diagnosis.cause}
    if diagnosis.first_nonfinite_epoch is not None:
        tags[NONFINITE_TAG] = str(diagnosis.first_nonfinite_epoch)
    return tags


def measured_metrics(keys):
    """The metrics ``m`` with ``gap/<m>`` and ``gap/<m>/drift`` among ``keys``,
    the loss first. A metric's name may hold ``/`` (multi-output heads)."""
    keys = set(keys)
    names = [key[len(GAP) + 1:] for key in keys
             if key.startswith(GAP + "/") and f"{key}/{PARTS[0]}" in keys]
    return loss_first(names)


def parse_records(metrics):
    """Per-epoch records from logged histories: the inverse of :func:`epoch_metrics`.

    Args:
        metrics: ``{key: {step: value}}`` (keys gaptrack does not write are ignored).

    Returns:
        ``[EpochRecord]`` by step, one per step at which any key was logged.
    """
    records = {}

    def at(step):
        return records.setdefault(step, EpochRecord(step=step))

    names = measured_metrics(metrics)
    for m in names:
        gaps = metrics[metric_key(GAP, m)]
        for step, gap in gaps.items():
            parts = [metrics.get(part_key(m, p), {}).get(step, math.nan) for p in PARTS]
            at(step).parts[m] = Parts(gap, *parts)
    part_keys = {part_key(m, p) for m in names for p in PARTS}
    kinds = (FIT, VAL, EVAL_TRAIN, TRAIN_MODE, PRECISE_BN, RETURNED)
    for key, history in metrics.items():
        kind, _, rest = key.partition("/")
        if key == NOISE_LOSS:
            for step, value in history.items():
                at(step).noise = value
        elif key == BN_SPREAD:
            for step, value in history.items():
                at(step).bn_spread = value
        elif kind == STALENESS:
            stat, _, layer = rest.partition("/")
            if stat in STALENESS_STATS and layer:
                index = STALENESS_STATS.index(stat)
                for step, value in history.items():
                    lags = at(step).staleness.setdefault(layer, [math.nan, math.nan])
                    lags[index] = value
        elif kind in kinds and rest and key not in part_keys:
            for step, value in history.items():
                getattr(at(step), kind)[rest] = value
    for record in records.values():
        record.staleness = {k: tuple(v) for k, v in record.staleness.items()}
    return [records[step] for step in sorted(records)]


def history_keys(logged):
    """Which of a run's logged metric keys :func:`parse_records` reads (all
    per-epoch keys gaptrack writes; not the run-level summaries)."""
    kinds = {FIT, VAL, EVAL_TRAIN, TRAIN_MODE, PRECISE_BN, RETURNED, GAP, STALENESS}
    return [key for key in logged
            if key in (NOISE_LOSS, BN_SPREAD) or (key.partition("/")[0] in kinds
                                                  and not key.startswith(f"{STALENESS}/{WORST}/"))]
