"""``GapTracker``: the Keras callback that logs the fit/evaluate gap every epoch.

At the end of every epoch (or every ``every``-th, and always the last) it
measures the model on the probe (:mod:`gaptrack.measurement`), decomposes the gap
(:mod:`gaptrack.decompose`) and logs, at step = epoch (0-based, as Keras and
MLflow's autolog count), in one ``log_batch`` request:

``fit/<m>``, ``val/<m>``, ``eval_train/<m>``, ``train_mode/<m>``,
``precise_bn/<m>``, ``gap/<m>`` and ``gap/<m>/{drift,mode,bn_ema}``,
``bn/<layer>/mean_lag`` and ``bn/<layer>/var_lag``, and ``noise/loss`` (the
standard error of ``eval_train/loss`` as a mean of per-sample losses on the probe),

plus one BN snapshot table per measured epoch (:mod:`gaptrack.snapshots`). At
train end: ``gap_final/<m>``, ``gap_max_abs/<m>``, ``gap_mean_abs/<m>``, the
worst BN layer's lags (``bn_worst/mean_lag``, ``bn_worst/var_lag``), the tags
``gaptrack.version``, ``gaptrack.diagnosis`` (:mod:`gaptrack.diagnosis`),
``gaptrack.probe_size``, ``gaptrack.batch_size``, and the per-run report under
``gaptrack/report/`` (:mod:`gaptrack.report`).

It does not disturb training: it measures statelessly (no weight, BN statistic,
seed or metric variable changes), never modifies ``logs``, and a tracking
failure is a warning, with the data retried at the next epoch.
"""

import contextlib
import math
import warnings

import keras

from gaptrack import __version__
from gaptrack.decompose import decompose, gap_history, summarize
from gaptrack.measurement import Measurer
from gaptrack.probe import Probe
from gaptrack.report import RunHistory, log_report
from gaptrack.snapshots import snapshot_frame, snapshot_path
from gaptrack.tracking import DEFAULT_CLOSE_TIMEOUT, RunLogger

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
            ``tf.data.Dataset`` of batches, or a :class:`gaptrack.probe.Probe`.
            The probe is drawn from it once (see :mod:`gaptrack.probe`).
        batch_size: ``fit``'s batch size. The training-mode and PreciseBN
            measurements depend on it. When omitted it is read from a
            ``tf.data.Dataset``'s first batch, or inferred from the number of
            steps per epoch when that fits one batch size only; otherwise a
            :class:`BatchSizeWarning` says which was assumed.
        probe_size: measure on at most this many samples (default 10,000).
        every: measure every ``every``-th epoch (and always the last);
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
                 close_timeout=DEFAULT_CLOSE_TIMEOUT, class_weight=None):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.probe = Probe.from_data(data, probe_size=probe_size, seed=seed)
        if class_weight is not None:
            self.probe = self.probe.with_class_weight(class_weight)
        self.batch_size = batch_size
        self.every = every
        self.seed = seed
        self.bn_snapshots = bn_snapshots
        self.inference_batch_size = inference_batch_size
        self._run_id = run_id
        self.close_timeout = close_timeout
        self.logger = None
        self._measurer = None
        self._decompositions = []
        self._last_lags = {}

    @property
    def run_id(self):
        """The MLflow run logged to (``None`` before training starts)."""
        return self.logger.run_id if self.logger else self._run_id

    # -- Keras hooks -------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self.batch_size is None:
            self.batch_size = self._infer_batch_size((self.params or {}).get("steps"))
        self._measurer = Measurer(self.model, self.batch_size, seed=self.seed,
                                  inference_batch_size=self.inference_batch_size)
        self._decompositions = []
        self._history = {}
        self.logger = RunLogger(self._run_id, close_timeout=self.close_timeout)
        self._tags = {
            "gaptrack.version": __version__,
            "gaptrack.probe_size": str(self.probe.size),
            "gaptrack.batch_size": str(self.batch_size),
        }
        self.logger.set_tags(self._tags)

    def on_epoch_end(self, epoch, logs=None):
        epochs = (self.params or {}).get("epochs")
        measure = epoch % self.every == 0 or (epochs is not None and epoch == epochs - 1)
        self.log_epoch(epoch, logs or {}, measure=measure)

    def on_train_end(self, logs=None):
        if self.logger is None:
            return
        history = gap_history(self._decompositions)
        final = summarize(history)
        if self._last_lags:
            final["bn_worst/mean_lag"] = max(lag[0] for lag in self._last_lags.values())
            final["bn_worst/var_lag"] = max(lag[1] for lag in self._last_lags.values())
        self.logger.log_metrics(final, step=0)
        if self._last_lags:
            worst = {"gaptrack.bn_worst_layer": max(
                self._last_lags, key=lambda k: self._last_lags[k][0])}
            self._tags.update(worst)
            self.logger.set_tags(worst)
        if self._decompositions:
            # the diagnosis tags and gaptrack/report/, from the tracker's own copy of
            # what it logged
            run_id = self.logger.run_id or "(not yet created)"
            log_report(self.logger, RunHistory(run_id=run_id, run_name=run_id,
                                               metrics=self._history, tags=dict(self._tags)))
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
            The ``{key: value}`` logged at this step.
        """
        if self._measurer is None:
            raise RuntimeError("GapTracker.log_epoch needs a model: use it as a fit() "
                               "callback or inside `with tracker.track(model):`")
        fit = {k: float(v) for k, v in logs.items() if not k.startswith("val_")}
        metrics = {f"fit/{k}": v for k, v in fit.items()}
        metrics.update({f"val/{k[4:]}": float(v) for k, v in logs.items() if k.startswith("val_")})
        if measure:
            m = self._measurer.measure(self.probe)
            parts = decompose(fit, m.eval_train, m.train_mode, m.precise_bn)
            self._decompositions.append(parts)
            metrics.update(m.as_metrics())
            metrics.update(parts)
            if m.loss_standard_error is not None:
                metrics["noise/loss"] = m.loss_standard_error
            for stats in m.bn:
                if all(math.isfinite(v) for v in stats.mean):
                    lag = self._last_lags[stats.key] = stats.lag
                    metrics[f"bn/{stats.key}/mean_lag"], metrics[f"bn/{stats.key}/var_lag"] = lag
            if self.bn_snapshots and m.bn:
                self.logger.log_table(snapshot_frame(step, m.bn), snapshot_path(step))
        self.logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            self._history.setdefault(key, {})[step] = value
        return metrics

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
                   f"{candidates[0]} to {candidates[-1]}")
        else:
            why = "the number of training steps is not known"
        warnings.warn(
            f"gaptrack: {why}; assuming batch_size={guess}. Pass "
            "GapTracker(..., batch_size=<fit's batch_size>) to measure at the right one.",
            BatchSizeWarning, stacklevel=3,
        )
        return guess
