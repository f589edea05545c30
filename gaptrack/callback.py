"""``GapTracker``: the Keras callback that logs the fit/evaluate gap every epoch.

At the end of every epoch (or every ``every``-th, and always the last one that
ran, also when a callback such as ``EarlyStopping`` stopped ``fit``) it
measures the model on the probe (:mod:`gaptrack.measurement`), decomposes the
gap (:mod:`gaptrack.decompose`) and logs, at step = epoch (0-based, as Keras and
MLflow's autolog count), in one ``log_batch`` request:

the keys of :mod:`gaptrack.keys` (``fit/<m>``, ``val/<m>``, ``eval_train/<m>``,
``train_mode/<m>``, ``precise_bn/<m>``, ``gap/<m>`` and its parts,
``staleness/{mean,var}/<layer>``, ``noise/loss``), plus one BN snapshot table
per measured epoch (:mod:`gaptrack.snapshots`). At train end: the summaries
(``gap_final/<m>``, ``gap_max_abs/<m>``, ``gap_mean_abs/<m>``,
``staleness/worst/{mean,var}``), the tags (version, diagnosis, probe and batch
size) and the per-run report under ``gaptrack/report/`` (:mod:`gaptrack.report`).

The model fit() returns: when its weights, at train end, are not those of the
last measured epoch (``EarlyStopping(restore_best_weights=True)`` put back an
earlier epoch's), the tracker measures them once more and logs
``returned/<m>`` (their ``eval_train``) at the last epoch's step, with the tag
``gaptrack.returned_weights`` (``epoch N`` when they are a measured epoch's,
else ``restored``); the summaries and the diagnosis keep describing the
measured epochs, and the report says which weights it describes. Keras calls
the callbacks' ``on_train_end`` in list order and ``EarlyStopping`` restores in
its own: put the tracker *after* it (``autolog`` does), or it measures the last
epoch's weights as the returned ones.

It keeps one history, a list of :class:`gaptrack.record.EpochRecord`, from which
the summaries and the report are made. Each measured epoch also logs two step
images (``gaptrack.decomposition``, ``gaptrack.bn_staleness``), and at train end
the report's headline becomes the run's description in the MLflow UI (never
over one the user wrote). It does not disturb training: it
measures statelessly (no weight, BN statistic, seed or metric variable
changes), never modifies ``logs``, a tracking failure is a warning with the data
retried in the background, and any other failure inside it is one warning
(:mod:`gaptrack.safety`): training goes on.

**Distributed training** (:mod:`gaptrack.distribute`). Under a ``tf.distribute``
strategy the measurements are those of each replica's shard (``batch_size`` is
the global batch) and the tag ``gaptrack.replicas`` says how many replicas
trained in sync. Under ``MultiWorkerMirroredStrategy`` every worker runs the
callback, and only the chief creates the MLflow run, measures and logs; the
other workers create nothing, send no request and measure nothing. Why not
measure a share of the probe on each worker and all-reduce: the workers hold
identical weights after every step (mirrored, all-reduced), and the chief's BN
moving statistics are the ones its saved model keeps, so the chief alone
measures what the job produced; and a collective inside a callback would hang
the whole job the day one worker's measurement fails (a failure here is a
warning, training goes on), where the chief measuring alone only keeps the
others waiting at the next step's all-reduce for as long as it measures. One
job is thus one run, every epoch logged once, with the requests of one
process (one ``log_batch`` per epoch, plus the BN snapshot).
"""

import contextlib
import hashlib
import math
import os
import tempfile
import warnings

import keras
import numpy as np

from gaptrack import __version__, charts, keys
from gaptrack.decompose import decompose, summarize
from gaptrack.distribute import replication
from gaptrack.measurement import Measurer
from gaptrack.probe import Probe, ProbeWarning, check_positive_int
from gaptrack.record import EpochRecord, RunHistory, loss_first, natural_order
from gaptrack.render import Rendering
from gaptrack.report import build_report
from gaptrack.safety import Guard
from gaptrack.snapshots import snapshot_frame
from gaptrack.tracking import DEFAULT_CLOSE_TIMEOUT, RunLogger
from gaptrack.uris import check_tracking_uri

#: Keras' default batch size for in-memory data.
KERAS_DEFAULT_BATCH_SIZE = 32


class BatchSizeWarning(UserWarning):
    """The training batch size had to be guessed."""


def infer_batch_size(samples, steps):
    """The batch sizes ``b`` for which ``samples`` in ``steps`` steps is possible.

    ``ceil(samples / b) == steps`` holds for ``samples/steps <= b <
    samples/(steps-1)``: 1,000 samples in 16 steps fits 63 to 66.

    Returns:
        ``range`` of the possible batch sizes (empty when none fits). With one
        step, every ``b >= samples`` fits and all give the same single batch,
        so ``range(samples, samples + 1)``.
    """
    if not samples or not steps or steps <= 0:
        return range(0)
    low = -(-samples // steps)
    if steps == 1:
        return range(low, low + 1)
    high = -(-samples // (steps - 1)) - 1
    return range(low, high + 1) if low <= high else range(0)


class GapTracker(keras.callbacks.Callback):
    """Log what ``fit()`` reports, what ``evaluate()`` says, and why they differ.

    Args:
        data: the training data (as given to ``fit``, without the validation
            part): ``(x, y)``, ``(x, y, sample_weight)``, a finite
            ``tf.data.Dataset`` of batches, a ``keras.utils.PyDataset``, or a
            :class:`gaptrack.probe.Probe`. The probe is drawn from it once (see
            :mod:`gaptrack.probe`). ``None`` logs ``fit/*`` and ``val/*`` only.
        batch_size: ``fit``'s batch size. The training-mode and PreciseBN
            measurements depend on it. When omitted it is read from a
            ``tf.data.Dataset``'s first batch, or inferred from the number of
            steps per epoch when that fits one batch size only; otherwise a
            :class:`BatchSizeWarning` says which was assumed.
        probe_size: measure on at most this many samples (default 10,000).
        every: measure every ``every``-th epoch (and always the last that ran);
            ``fit/*`` and ``val/*`` are logged every epoch.
        seed: seed of the probe sample and of the Dropout masks.
        bn_snapshots: log the per-channel BN snapshot table each measured epoch.
        run_id: log to this MLflow run; by default the active run is joined, or
            a run is started (and ended at train end).
        inference_batch_size: batch size of the inference passes.
        close_timeout: seconds the end of training waits for the tracking
            server; what is not sent by then stays in the spool for
            ``gaptrack sync`` (see :mod:`gaptrack.tracking`).
        class_weight: ``fit``'s ``class_weight``, if it has one: the probe is
            weighted as ``fit`` weights the training data, so that the
            measurements weight the samples as ``fit/loss`` does.
        loss: for a model compiled without a loss (a ``train_step`` that
            computes its own): that loss, as ``fn(y_true, y_pred)``, a
            ``keras.losses.Loss`` or its name, measured as ``loss``; without it
            only such a model's compiled metrics are measured (``fit/*`` is
            logged either way).

    Example:
        >>> import mlflow, gaptrack
        >>> with mlflow.start_run():
        ...     model.fit(x, y, batch_size=64, epochs=5,
        ...               callbacks=[gaptrack.GapTracker((x, y), batch_size=64)])

    Custom training loops (``train_on_batch``) log through :meth:`track` and
    :meth:`log_epoch`, with the loop's own numbers as the ``fit/*`` side::

        tracker = gaptrack.GapTracker((x, y), batch_size=32)
        with tracker.track(model):
            for step in range(100):
                logs = model.train_on_batch(xb, yb, return_dict=True)
                tracker.log_epoch(step, logs)
    """

    def __init__(self, data, batch_size=None, *, probe_size=None, every=1, seed=0,
                 bn_snapshots=True, run_id=None, inference_batch_size=None,
                 close_timeout=DEFAULT_CLOSE_TIMEOUT, class_weight=None, loss=None):
        super().__init__()
        self.every = check_positive_int("every", every)
        self.batch_size = None if batch_size is None else check_positive_int("batch_size",
                                                                             batch_size)
        #: The probe, or ``None``: then only ``fit/*`` and ``val/*`` are logged.
        self.probe = None if data is None else Probe.from_data(data, probe_size=probe_size,
                                                               seed=seed)
        if class_weight is not None and self.probe is not None:
            self.probe = self.probe.with_class_weight(class_weight)
        self.seed = seed
        self.bn_snapshots = bn_snapshots
        self.inference_batch_size = inference_batch_size
        self.loss = loss
        self.close_timeout = close_timeout
        self._given_run_id = run_id
        self.logger = None
        #: The one history: an :class:`EpochRecord` per logged step.
        self.records = []
        self._measurer = None
        #: How the model trains (:class:`gaptrack.distribute.Replication`).
        self.replication = None
        #: ``{step: fingerprint of the weights}`` of the measured epochs.
        self._fingerprints = {}
        #: The step last measured or tried to be (a failure is not tried again).
        self._last_attempt = None
        self._tags = {}
        self._guard = Guard()

    @property
    def run_id(self):
        """The MLflow run logged to (``None`` before training starts)."""
        return self.logger.run_id if self.logger else self._given_run_id

    # -- Keras hooks -------------------------------------------------------------

    def on_train_begin(self, logs=None):
        import mlflow

        check_tracking_uri(mlflow.get_tracking_uri())  # a bad URI is refused, not warned
        self.records = []
        self._measurer = None
        self.logger = None
        self._fingerprints = {}
        self._last_attempt = None
        self._guard.reset()
        self.replication = replication(self.model)
        if not self.replication.chief:
            return  # another worker of the job logs; see the module docstring
        self._tags = {keys.VERSION_TAG: __version__,
                      keys.REPLICAS_TAG: str(self.replication.replicas)}
        if self.probe is not None:
            if self.batch_size is None:
                self.batch_size = self._infer_batch_size((self.params or {}).get("steps"))
            self._check_steps((self.params or {}).get("steps"))
            self._tags.update({keys.PROBE_SIZE_TAG: str(self.probe.size),
                               keys.BATCH_SIZE_TAG: str(self.batch_size)})
        with self._guard("starting the MLflow run"):
            self.logger = RunLogger(self._given_run_id, close_timeout=self.close_timeout)
            self.logger.set_tags(self._tags)
        if self.probe is not None:
            with self._guard("preparing the measurement"):
                self._measurer = Measurer(self.model, self.batch_size, seed=self.seed,
                                          inference_batch_size=self.inference_batch_size,
                                          loss=self.loss)
        self._tag_failures()

    def on_epoch_end(self, epoch, logs=None):
        epochs = (self.params or {}).get("epochs")
        # a callback before this one (EarlyStopping, TerminateOnNaN) may have stopped fit
        last = (epochs is not None and epoch == epochs - 1) or getattr(self.model, "stop_training", False)
        measure = epoch % self.every == 0 or last
        self.log_epoch(epoch, logs or {}, measure=measure)

    def on_train_end(self, logs=None):
        if self.logger is None:
            return
        with self._guard("measuring the weights fit() returns"):
            self._measure_returned()
        summaries = summarize(self.records)
        last = next((r for r in reversed(self.records) if r.staleness), None)
        worst = None
        if last is not None:
            worst = tuple(max(lags[i] for lags in last.staleness.values()) for i in range(2))
            self._tags[keys.WORST_LAYER_TAG] = max(last.staleness,
                                                   key=lambda k: last.staleness[k][0])
        with self._guard("logging the summaries"):
            self.logger.log_metrics(keys.summary_metrics(summaries, worst), step=0)
            self.logger.set_tags(self._tags)
        if any(r.parts for r in self.records):
            with self._guard("the report"):
                self._log_report()
        self._tag_failures()
        self.logger.close()

    # -- the measurement ---------------------------------------------------------

    def log_epoch(self, step, logs, measure=True):
        """Log one epoch (or loop iteration) at ``step``.

        Args:
            step: the MLflow step (epoch index, or loop iteration).
            logs: ``{metric: value}`` as the training reported it; keys starting
                with ``val_`` are validation values.
            measure: run the measurements and the decomposition (else only
                ``fit/*`` and ``val/*`` are logged).

        Returns:
            The :class:`gaptrack.record.EpochRecord` logged at this step.
        """
        if self.model is None:
            raise RuntimeError("GapTracker.log_epoch needs a model: use it as a fit() "
                               "callback or inside `with tracker.track(model):`")
        record = EpochRecord(
            step=step,
            fit={k: float(v) for k, v in logs.items() if not k.startswith("val_")},
            val={k[len("val_"):]: float(v) for k, v in logs.items() if k.startswith("val_")},
        )
        measurement = None
        if measure and self._measurer is not None:
            self._last_attempt = step
            with self._guard(f"measuring epoch {step}", kind="measuring"):
                measurement = self._measurer.measure(self.probe)
        if measurement is not None:
            _add_measurement(record, measurement)
            self._fingerprints[step] = _fingerprint(self.model)
        self.records.append(record)
        if self.logger is not None:
            with self._guard("logging to MLflow", kind="logging"):
                if measurement is not None and self.bn_snapshots and measurement.bn:
                    self.logger.log_table(snapshot_frame(step, measurement.bn),
                                          keys.snapshot_path(step))
                self.logger.log_metrics(keys.epoch_metrics(record), step=step)
            if record.parts:
                with self._guard("charting the epoch", kind="charting"):
                    self._log_epoch_images(record)
            self._tag_failures()
        return record

    def _log_epoch_images(self, record):
        """The epoch's decomposition and BN staleness as step images, which the
        MLflow UI's image charts step through epoch by epoch."""
        names = loss_first(record.parts)
        self.logger.log_image(charts.png(charts.epoch_decomposition_figure(record, names)),
                              keys.DECOMPOSITION_IMAGE, record.step)
        if record.staleness:
            figure = charts.epoch_staleness_figure(record, natural_order(record.staleness))
            self.logger.log_image(charts.png(figure), keys.STALENESS_IMAGE, record.step)

    def _measure_returned(self):
        """Measure the last epoch that ran if it was not (a callback after this one
        stopped ``fit``), then the returned weights if they are not its."""
        if self._measurer is None or not self.records:
            return
        last = self.records[-1]
        if self._last_attempt != last.step:
            _add_measurement(last, self._measurer.measure(self.probe))
            self._fingerprints[last.step] = _fingerprint(self.model)
            unmeasured = keys.epoch_metrics(EpochRecord(step=last.step, fit=last.fit,
                                                        val=last.val))
            self.logger.log_metrics({k: v for k, v in keys.epoch_metrics(last).items()
                                     if k not in unmeasured}, step=last.step)
        measured = max(self._fingerprints, default=None)
        fingerprint = _fingerprint(self.model)
        if measured is None or fingerprint == self._fingerprints[measured]:
            return
        last.returned = self._measurer.inference_pass(self.probe)[0]
        self.logger.log_metrics(keys.epoch_metrics(EpochRecord(step=last.step,
                                                               returned=last.returned)),
                                step=last.step)
        same = [step for step, f in self._fingerprints.items() if f == fingerprint]
        self._tags[keys.RETURNED_TAG] = f"epoch {same[-1]}" if same else "restored"

    def _tag_failures(self):
        """Tag the run with what failed inside the tracker, when something did."""
        if self._guard.failures and self.logger is not None:
            error = self._guard.summary
            if self._tags.get(keys.ERROR_TAG) != error:
                self._tags[keys.ERROR_TAG] = error
                self.logger.set_tags({keys.ERROR_TAG: error})

    def _log_report(self):
        """Tag the diagnosis, describe the run and log the report files, within
        what is left of ``close_timeout``."""
        found = self.logger.wait_for_run(self.logger.remaining_budget())
        run_id, run_name = found or (self.logger.run_id or "(not yet created)",) * 2
        report = build_report(RunHistory(run_id=run_id, run_name=run_name,
                                         records=self.records, tags=dict(self._tags)))
        rendering = Rendering(report)
        artifacts = rendering.artifacts()
        self.logger.set_tags(keys.diagnosis_tags(report.diagnosis))
        self.logger.set_description(rendering.description())
        with tempfile.TemporaryDirectory(prefix="gaptrack-report-") as tmp:
            for name, data in artifacts.items():
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                self.logger.log_artifact(path, keys.REPORT_DIR)  # copied into the spool

    @contextlib.contextmanager
    def track(self, model):
        """Track a custom training loop: the run is started (or joined) on entry,
        the summary and tags are logged on exit. Call :meth:`log_epoch` inside."""
        if self.batch_size is None:
            self.batch_size = self._infer_batch_size(None)
        self.set_model(model)
        self.on_train_begin()
        try:
            yield self
        finally:
            self.on_train_end()

    def _check_steps(self, steps):
        """Warn when the tracker's data has more samples than fit's steps per epoch
        at the batch size cover: fit trains on part of it only (``validation_split``).
        (Fewer is a sample of the training data, e.g. an explicit probe.)"""
        if not steps or not self.probe.total or self.probe.total <= steps * self.batch_size:
            return
        low, high = (steps - 1) * self.batch_size + 1, steps * self.batch_size
        warnings.warn(
            f"gaptrack: fit() runs {steps} steps per epoch at batch_size={self.batch_size}, "
            f"i.e. {low} to {high} samples, but the tracker was given {self.probe.total}: it "
            "measures data fit() does not train on. With fit(validation_split=s) give it the "
            "training part only, GapTracker((x[:n], y[:n]), ...) with n = int(len(x) * (1 - s)) "
            "(gaptrack.autolog() does so).",
            ProbeWarning, stacklevel=3,
        )

    def _infer_batch_size(self, steps):
        if self.probe.dataset_batch_size:
            return self.probe.dataset_batch_size
        candidates = infer_batch_size(self.probe.total, steps)
        if len(candidates) == 1:
            return candidates[0]
        guess = (KERAS_DEFAULT_BATCH_SIZE if KERAS_DEFAULT_BATCH_SIZE in candidates or not candidates
                 else candidates[0])
        if candidates:
            why = (f"{self.probe.total} samples in {steps} steps fits batch sizes "
                   f"{candidates[0]} to {candidates[-1]} (if the data given to the tracker is "
                   "what fit() trains on: with validation_split, give it the training part only)")
        else:
            why = "the number of training steps is not known"
        warnings.warn(
            f"gaptrack: {why}; assuming batch_size={guess}. Pass "
            "GapTracker(..., batch_size=<fit's batch_size>) to measure at the right one.",
            BatchSizeWarning, stacklevel=3,
        )
        return guess


def _fingerprint(model):
    """A digest of the model's weights (what ``get_weights``/``set_weights`` move)."""
    digest = hashlib.blake2b(digest_size=16)
    for variable in model.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    return digest.hexdigest()


def _add_measurement(record, measurement):
    """Fill ``record`` with one measurement and the gap it decomposes."""
    record.eval_train = measurement.eval_train
    record.train_mode = measurement.train_mode
    record.precise_bn = measurement.precise_bn or {}
    record.parts = decompose(record.fit, measurement.eval_train, measurement.train_mode,
                             measurement.precise_bn)
    record.noise = measurement.loss_standard_error
    record.bn_spread = measurement.bn_spread
    record.staleness = {stats.key: stats.staleness for stats in measurement.bn
                        if all(math.isfinite(v) for v in stats.mean)}
