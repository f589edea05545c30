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

import keras

from gaptrack import __version__, keys
from gaptrack.decompose import add_measurement, summarize
from gaptrack.distribute import replication
from gaptrack.measurement import Measurer
from gaptrack.fitparams import check_steps, guess_batch_size
from gaptrack.keras3 import require_keras3
from gaptrack.labels import check_labels
from gaptrack.probe import Probe, check_positive_int
from gaptrack.record import EpochRecord, RunHistory
from gaptrack.safety import Guard
from gaptrack.uris import check_tracking_uri
from gaptrack.weights import digest

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
            server (default: ``gaptrack.tracking.DEFAULT_CLOSE_TIMEOUT``, 30 s);
            what is not sent by then stays in the spool for ``gaptrack sync``
            (see :mod:`gaptrack.tracking`).
        mlflow: log to MLflow (the default). ``mlflow=False`` measures and keeps
            the records in memory only: no run, no spool, no request, no file
            written, MLflow not imported; read them with :meth:`to_frame` and
            :meth:`report`.
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

    Without MLflow, in a notebook::

        tracker = gaptrack.GapTracker((x, y), batch_size=64, mlflow=False)
        model.fit(x, y, batch_size=64, epochs=5, callbacks=[tracker])
        tracker.report()      # displays itself; tracker.to_frame() for pandas

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
                 close_timeout=None, class_weight=None, loss=None,
                 mlflow=True):
        super().__init__()
        if not mlflow and run_id is not None:
            raise ValueError(f"GapTracker(mlflow=False) logs to no run, so run_id={run_id!r} "
                             "cannot be used: leave run_id out, or keep mlflow=True")
        self.mlflow = bool(mlflow)
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
        #: ``{step: fingerprint of the weights}`` of the measured epochs
        #: (:attr:`gaptrack.weights.WeightDigest.fingerprint`, read on the device).
        self._fingerprints = {}
        #: The step last measured or tried to be (a failure is not tried again).
        self._last_attempt = None
        self._tags = {}
        self._guard = Guard()
        #: The epoch images' renderer (:class:`gaptrack.publish.EpochImages`).
        self._images = None

    @property
    def run_id(self):
        """The MLflow run logged to (``None`` before training starts)."""
        return self.logger.run_id if self.logger else self._given_run_id

    # -- Keras hooks -------------------------------------------------------------

    def set_model(self, model):
        # the first hook Keras calls: a Keras 2 model is refused before anything fails
        require_keras3(model, "gaptrack.GapTracker")
        super().set_model(model)

    def on_train_begin(self, logs=None):
        if self.mlflow:
            import mlflow

            check_tracking_uri(mlflow.get_tracking_uri())  # a bad URI is refused, not warned
        self.records = []
        self._measurer = None
        self.logger = None
        self._images = None
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
                self.batch_size = guess_batch_size(self.probe, (self.params or {}).get("steps"))
            check_steps(self.probe, self.batch_size, (self.params or {}).get("steps"))
            check_labels(self.model, self.probe, self.loss)  # before the run
            self._tags.update({keys.PROBE_SIZE_TAG: str(self.probe.size),
                               keys.BATCH_SIZE_TAG: str(self.batch_size)})
            if self.probe.origin:
                self._tags[keys.PROBE_ORIGIN_TAG] = self.probe.origin
        if self.mlflow:
            with self._guard("starting the MLflow run"):
                from gaptrack import publish
                from gaptrack.tracking import DEFAULT_CLOSE_TIMEOUT, RunLogger

                timeout = DEFAULT_CLOSE_TIMEOUT if self.close_timeout is None else self.close_timeout
                self.logger = RunLogger(self._given_run_id, close_timeout=timeout)
                self._images = publish.EpochImages(self.logger)
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
        last = ((epochs is not None and epoch == epochs - 1)
                or getattr(self.model, "stop_training", False))
        measure = epoch % self.every == 0 or last
        self.log_epoch(epoch, logs or {}, measure=measure)

    def on_train_end(self, logs=None):
        if self.replication is None or not self.replication.chief:
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
        if self.logger is None:
            return
        with self._guard("logging the summaries"):
            self.logger.log_metrics(keys.summary_metrics(summaries, worst), step=0)
            self.logger.set_tags(self._tags)
        with self._guard("charting the epoch", kind="charting"):
            self._images.finish(self.logger.remaining_budget())
        if any(r.parts for r in self.records):
            with self._guard("the report"):
                from gaptrack import publish

                publish.log_report(self.logger, self.records, self._tags)
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
                weights = digest(self.model)
                measurement = self._measurer.measure(self.probe, weights)
        if measurement is not None:
            add_measurement(record, measurement)
            self._fingerprints[step] = weights.fingerprint
        self.records.append(record)
        if self.logger is not None:
            with self._guard("logging to MLflow", kind="logging"):
                if measurement is not None and self.bn_snapshots and measurement.bn:
                    from gaptrack.snapshots import snapshot_frame

                    self.logger.log_table(snapshot_frame(step, measurement.bn),
                                          keys.snapshot_path(step))
                self.logger.log_metrics(keys.epoch_metrics(record), step=step)
            if record.parts:
                with self._guard("charting the epoch", kind="charting"):
                    self._images.check()  # a failure of an earlier epoch's images
                    self._images.submit(record)
            self._tag_failures()
        return record

    def _measure_returned(self):
        """Measure the last epoch that ran if it was not (a callback after this one
        stopped ``fit``), then the returned weights if they are not its."""
        if self._measurer is None or not self.records:
            return
        last = self.records[-1]
        weights = digest(self.model)
        if self._last_attempt != last.step:
            add_measurement(last, self._measurer.measure(self.probe, weights))
            self._fingerprints[last.step] = weights.fingerprint
            unmeasured = keys.epoch_metrics(EpochRecord(step=last.step, fit=last.fit,
                                                        val=last.val))
            self._log({k: v for k, v in keys.epoch_metrics(last).items()
                       if k not in unmeasured}, step=last.step)
        measured = max(self._fingerprints, default=None)
        fingerprint = weights.fingerprint
        if measured is None or fingerprint == self._fingerprints[measured]:
            return
        last.returned = self._measurer.inference_pass(self.probe)[0]
        self._log(keys.epoch_metrics(EpochRecord(step=last.step, returned=last.returned)),
                  step=last.step)
        same = [step for step, f in self._fingerprints.items() if f == fingerprint]
        self._tags[keys.RETURNED_TAG] = f"epoch {same[-1]}" if same else "restored"

    def _log(self, metrics, step):
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    # -- what it holds -----------------------------------------------------------

    def to_frame(self):
        """The history as a DataFrame: one row a logged epoch (index ``epoch``),
        one column a key of :mod:`gaptrack.keys` (``fit/loss``,
        ``eval_train/loss``, ``gap/loss/drift``, ...; NaN where an epoch was not
        measured). The same frame as ``gaptrack.load_run(run_id).history``."""
        return keys.records_frame(self.records)

    def report(self):
        """The :class:`gaptrack.Report` of what was measured so far: the one
        the tracker logs at train end, and ``gaptrack.load_run(...).report``.

        Raises:
            gaptrack.report.ReportError: no epoch was measured yet.
        """
        from gaptrack.report import build_report

        found = self.logger.wait_for_run(0) if self.logger is not None else None
        run_id, run_name = found or (self.run_id, None)
        return build_report(RunHistory(run_id=run_id, run_name=run_name, records=self.records,
                                       tags=dict(self._tags)))

    def _tag_failures(self):
        """Tag the run with what failed inside the tracker, when something did."""
        if self._guard.failures and self.logger is not None:
            error = self._guard.summary
            if self._tags.get(keys.ERROR_TAG) != error:
                self._tags[keys.ERROR_TAG] = error
                self.logger.set_tags({keys.ERROR_TAG: error})

    @contextlib.contextmanager
    def track(self, model):
        """Track a custom training loop: the run is started (or joined) on entry,
        the summary and tags are logged on exit. Call :meth:`log_epoch` inside."""
        if self.batch_size is None:
            self.batch_size = guess_batch_size(self.probe, None)
        self.set_model(model)
        self.on_train_begin()
        try:
            yield self
        finally:
            self.on_train_end()
