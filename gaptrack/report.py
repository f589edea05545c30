"""The per-run report: why ``fit()`` and ``evaluate()`` disagree, in one sentence,
with its numbers, and what to do about it.

:func:`build_report` turns a run's history (:class:`gaptrack.record.RunHistory`:
the tracker's own records at train end, or a run read back from the server by
:func:`gaptrack.runs.load_history`) into a :class:`Report`, with no MLflow and no
Keras: the :class:`gaptrack.diagnosis.Diagnosis` of the loss, the sentence (what
fit said, what evaluate says, which cause explains how much of the gap, against
which noise), the remedy that fits the cause and a table of every metric.
:mod:`gaptrack.render` makes it Markdown, HTML and charts; the tracker logs them
under ``gaptrack/report/`` at train end, and ``gaptrack report RUN_ID`` prints it.

One :class:`Report` for every source: :func:`gaptrack.explain` (one model
state, no MLflow), a tracker (``GapTracker.report()``, and the report it logs at
train end) and a tracked run read back (``gaptrack.load_run(run_id).report``,
``gaptrack report RUN_ID``): the same history gives the same sentence, table and
remedy wherever it is read. It shows itself: ``str(report)`` for a terminal,
``report._repr_html_()`` in Jupyter, ``report.to_frame()`` for pandas,
``report.to_markdown()``.

Example:
    >>> report = gaptrack.load_run(run_id).report
    >>> report.diagnosis
    'bn_ema'
    >>> print(report.sentence)
"""

import math

from gaptrack.diagnosis import diagnose, is_accuracy, standard_error
from gaptrack.keys import (BATCH_SIZE_TAG, EVAL_TRAIN, PARTS, PRECISE_BN, PROBE_ORIGIN_TAG,
                           PROBE_SIZE_TAG, REPLICAS_TAG, RETURNED_TAG, WORST_LAYER_TAG,
                           metric_key)
from gaptrack.record import natural_order

#: What each cause is, in the words of the sentence.
_CAUSE_EXPLAINED = {
    "drift": "fit() averages the loss of every batch taken before its update, "
             "while the weights moved during the epoch",
    "mode": "Dropout and BatchNormalization's batch statistics act in fit(), "
            "not in evaluate()",
    "bn_ema": "BatchNormalization's moving averages lag behind the statistics its layers see",
}


class ReportError(LookupError):
    """No report can be made for the run asked for; the message says why."""


def build_report(history):
    """The :class:`Report` of a run's history (no MLflow, no Keras).

    The loss decides the diagnosis (:func:`gaptrack.diagnosis.diagnose`); every
    measured metric gets a row of the table, at the diagnosed epoch.
    """
    names = history.names
    if not names:
        raise ReportError(f"run {history.run_id!r} has no measured epoch to report")
    probe_size = history.tags.get(PROBE_SIZE_TAG)
    probe_size = int(probe_size) if probe_size else None
    return Report(history, diagnose(history.records, names[0], probe_size=probe_size))


def _num(value, sign=False):
    """A number as the report prints it: 4 significant digits (``+`` for a
    difference when ``sign``), ``nan``/``inf`` as such, no negative zero, ``-``
    for ``None`` (not measured)."""
    if value is None:
        return "-"
    text = f"{value:+.4g}" if sign and math.isfinite(value) else f"{value:.4g}"
    return text.replace("-0", "+0" if sign else "0", 1) if float(text) == 0 else text


def _standard_errors(z):
    return f"{z:g} standard error" + ("" if z == 1 else "s")


def bn_spread_noise(probe_size, z):
    """Below this ``replicas/bn_spread`` is within noise: ``z * sqrt(2 / n)``,
    ``n`` the probe size. The probe itself pins a channel's mean down to
    ``1 / sqrt(n)`` standard deviations and its log-variance to ``sqrt(2 / n)``
    (the standard errors of a sample mean and of a sample log-variance): the
    replicas' copies differing by less than the larger of the two differ by
    less than the probe can resolve, and so matter less than its own noise.
    Without a probe size, any spread above 0 counts."""
    return z * math.sqrt(2.0 / probe_size) if probe_size else 0.0


#: The columns of :meth:`Report.to_frame`, in the order of the table.
COLUMNS = ("fit", "train_mode", "precise_bn", "eval_train", "gap", *PARTS, "noise")


class Report:
    """Why ``fit()`` and ``evaluate()`` disagree: :attr:`diagnosis`,
    :attr:`sentence`, :attr:`remedy`, and the numbers (:meth:`to_frame`).

    Made by :func:`build_report` from a run's history, whatever its source
    (see the module docstring).

    Args:
        history: the run's :class:`gaptrack.record.RunHistory`.
        evidence: its :class:`gaptrack.diagnosis.Diagnosis`.

    Attributes:
        history: the :class:`gaptrack.record.RunHistory` reported on.
        evidence: the :class:`gaptrack.diagnosis.Diagnosis` of the loss: the
            cause and the numbers behind it (epoch, gap, parts, noise).
    """

    def __init__(self, history, evidence):
        self.history = history
        self.evidence = evidence

    @property
    def diagnosis(self):
        """The dominant cause, as the tag ``gaptrack.diagnosis``: ``drift``,
        ``mode``, ``bn_ema``, ``none`` (within noise) or ``nonfinite``."""
        return self.evidence.cause

    def __repr__(self):
        run = f" run={self.history.run_id!r}" if self.history.run_id else ""
        return (f"<gaptrack.Report diagnosis={self.diagnosis!r} metric={self.evidence.metric!r} "
                f"epoch={self.evidence.epoch!r}{run}>")

    def __str__(self):
        """Plain text for a terminal (under 40 lines for up to a dozen metrics)."""
        from gaptrack.render import Rendering

        return Rendering(self).text()

    def _repr_pretty_(self, printer, cycle):
        """IPython's plain-text display (its terminal, a notebook's text/plain): the text."""
        printer.text(str(self))

    def to_markdown(self):
        """The report as Markdown: diagnosis, sentence, remedy, table, note."""
        from gaptrack.render import Rendering

        return Rendering(self).markdown(images=False)

    def _repr_html_(self):
        """Jupyter's display: the diagnosis, the sentence, the table, the remedy
        and the decomposition chart, in colours that read on light and dark
        themes."""
        from gaptrack.render import Rendering

        return Rendering(self).fragment()

    def to_frame(self):
        """The table as a DataFrame: one row a metric (the loss first), the
        columns :data:`COLUMNS` (NaN where not measured: ``precise_bn``
        without BN layers that train; ``fit``, ``gap`` and ``drift`` without
        ``fit()``'s numbers)."""
        import pandas as pd

        rows = self.rows
        frame = pd.DataFrame([[math.nan if r[c] is None else r[c] for c in COLUMNS] for r in rows],
                             columns=list(COLUMNS),
                             index=pd.Index([r["metric"] for r in rows], name="metric"))
        return frame.astype("float64")

    @property
    def bn_layers(self):
        """The BN layer keys with logged staleness, in natural order (``bn_2`` before ``bn_10``)."""
        return natural_order({layer for r in self.history.records for layer in r.staleness})

    def _record(self, epoch):
        return next((r for r in self.history.records if r.step == epoch), None)

    def _measured_epochs(self, metric):
        return {r.step for r in self.history.records if metric in r.eval_train}

    @property
    def rows(self):
        """One dict per measured metric, at the diagnosed epoch: ``metric`` and
        the :data:`COLUMNS`; ``None`` where a value was not measured (``noise``
        without a standard error, ``precise_bn`` without BN layers that train,
        ``fit``, ``gap`` and ``drift`` without ``fit()``'s numbers)."""
        record = self._record(self.evidence.epoch)
        rows = []
        for m in self.history.names:
            parts = record.parts.get(m)
            fit_known = m in record.fit
            row = {"metric": m, "fit": record.fit.get(m)}
            for kind in ("train_mode", "precise_bn", "eval_train"):
                row[kind] = getattr(record, kind).get(m)
            row["gap"] = parts.gap if parts and fit_known else None
            for p in PARTS:
                known = parts is not None and (fit_known or p != "drift")
                row[p] = getattr(parts, p) if known else None
            row["noise"] = standard_error(record, m, self.evidence.probe_size)
            rows.append(row)
        return rows

    @property
    def sentence(self):
        """Why fit and evaluate disagree, with the numbers, in one sentence."""
        d = self.evidence
        m = d.metric
        measured = d.epoch in self._measured_epochs(m)
        says = (f"evaluate() on the training data says {_num(d.eval_train)}" if measured
                else "evaluate() was not measured that epoch")
        at = "After fit()" if d.epoch is None else f"At epoch {d.epoch}"
        if d.cause == "nonfinite":
            return (f"{at}, fit() reported {m} {_num(d.fit)} and {says}: the {m} "
                    f"became non-finite (NaN or inf) at epoch {d.epoch}, so from then on there is "
                    "no gap to explain.")
        n = f"{d.probe_size} samples" if d.probe_size else "the probe"
        noise = f"±{_num(d.threshold)} ({_standard_errors(d.z)} on {n})"
        if d.fit_known:
            head = f"{at}, fit() reported {m} {_num(d.fit)} and {says}: "
            names, whole, what = PARTS, d.gap, "gap"
            of, agree = "(fit - evaluate)", "so the two agree"
        else:  # what the weights alone tell: training mode against evaluate()
            names = ("mode", "bn_ema")
            whole, what = sum(d.parts[p] for p in names), "difference"
            head = (f"Without fit()'s own numbers (pass history= to measure drift too): in "
                    f"training mode, as fit() computes its {m} but with the weights fit() ended "
                    f"with, the {m} is {_num(d.eval_train + whole)}, and evaluate() on the "
                    f"training data says {_num(d.eval_train)}: ")
            of, agree = "(training mode - evaluate)", "so only drift can make fit() report another number"
        if d.cause == "none":
            parts = ", ".join(f"{p} {_num(d.parts[p], sign=True)}" for p in names)
            within = ("within the noise of the measurement, " + noise if d.noise is not None
                      else "exactly 0")
            return (head + f"the {what}, {_num(whole, sign=True)}, and its parts ({parts}) are "
                    f"{within}, {agree}.")
        part = d.parts[d.cause]
        share = f" ({100 * part / whole:.0f}% of it)" if whole and part / whole > 0 else ""
        others = " and ".join(f"{p} {_num(d.parts[p], sign=True)}" for p in names if p != d.cause)
        noise = f"a noise of {noise}" if d.noise is not None else f"no error bar for {m}"
        return (head + f"a {what} of {_num(whole, sign=True)} {of}, of which {d.cause}, because "
                f"{_CAUSE_EXPLAINED[d.cause]}, explains {_num(part, sign=True)}{share}, against "
                f"{others}, and {noise}.")

    @property
    def context(self):
        """Sentences that qualify the diagnosis (possibly none): a probe that is
        one draw of a pipeline; BN layers that are all frozen, so BN cannot
        explain a gap; replicas whose BN moving statistics diverged
        (:func:`bn_spread_noise`)."""
        record = self._record(self.evidence.epoch)
        out = []
        origin = self.history.tags.get(PROBE_ORIGIN_TAG)
        if origin:
            out.append(f"The probe, the training samples evaluate() is measured on every epoch, "
                       f"is {origin}.")
        noise = bn_spread_noise(self.evidence.probe_size, self.evidence.z)
        if record is not None and record.bn_spread is not None and record.bn_spread > noise:
            replicas = self.history.tags.get(REPLICAS_TAG, "several")
            out.append(
                f"The {replicas} replicas' BatchNormalization moving statistics diverged: "
                f"they differ by up to {_num(record.bn_spread)} (replicas/bn_spread, in "
                f"standard deviations or log-ratio of scales; noise {_num(noise)}). Each replica "
                "moved its own copy towards the statistics of its own shards, so evaluate() "
                "under the strategy normalises each shard with another copy and depends on the "
                "batch size, while get_weights() and save() keep the first replica's, the "
                "model eval_train measures. Use `BatchNormalization(synchronized=True)` so "
                "that every replica normalises with the global batch and keeps one copy, or "
                "recompute the statistics once after training with "
                "`gaptrack.recalibrate_bn` (it sets every replica's copy).")
        if record is not None and record.staleness and not record.precise_bn:
            n = len(record.staleness)
            out.append(
                f"The model has {n} BatchNormalization layer{'s' if n > 1 else ''}, and none "
                "uses batch statistics in fit(): a frozen layer (trainable=False) runs in "
                "inference mode in Keras 3, in fit() too. So BN cannot make evaluate() differ "
                "from fit() (bn_ema is 0); what remains is Dropout's mode and drift, and the "
                "old symptom, evaluate() much worse than fit(), needs BN layers that train.")
        return out

    @property
    def weights(self):
        """Which weights the report describes, when ``fit()`` returned others
        (``EarlyStopping(restore_best_weights=True)``), with evaluate() on those;
        else ``None``."""
        returned_as = self.history.tags.get(RETURNED_TAG)
        record = next((r for r in reversed(self.history.records) if r.returned), None)
        if not returned_as or record is None:
            return None
        m = self.evidence.metric
        which = (f"the weights of {returned_as}" if returned_as.startswith("epoch")
                 else "weights restored by a callback, which are no measured epoch's")
        value = record.returned.get(m, math.nan)
        return (f"This report describes the weights at the end of each measured epoch; the "
                f"model fit() returned holds {which} (e.g. EarlyStopping(restore_best_weights"
                f"=True)), on which evaluate() on the training data says {m} {_num(value)}.")

    @property
    def remedy(self):
        """What to do about it (Markdown: code in backticks)."""
        d, tags = self.evidence, self.history.tags
        if d.cause == "bn_ema" and not self._recalibrating_helps:
            return (f"Do not recalibrate: on the training data the moving averages happen to do "
                    f"better than BN statistics recomputed on it (`{metric_key(PRECISE_BN, d.metric)}` "
                    f"{_num(d.eval_train + d.parts['bn_ema'])} against evaluate's "
                    f"{_num(d.eval_train)}), so `gaptrack.recalibrate_bn` would make evaluate() "
                    "worse. It means the model is not settled yet (typically barely trained, at a "
                    "large batch): the statistics of its layers' inputs move faster than the "
                    "moving averages follow. Train more steps; the gap shrinks as they settle.")
        if d.cause == "bn_ema":
            batch = tags.get(BATCH_SIZE_TAG, "<fit's batch_size>")
            worst = tags.get(WORST_LAYER_TAG)
            return ("Recompute the BN statistics before evaluating or saving the model: "
                    f"`gaptrack.recalibrate_bn(model, (x_train, y_train), batch_size={batch})` "
                    "(PreciseBN); or train more steps, or lower the BatchNormalization momentum "
                    "(e.g. `BatchNormalization(momentum=0.9)`) so that the moving averages keep "
                    "up." + (f" The stalest layer is `{worst}`." if worst else ""))
        return {
            "drift": f"Trust the epoch-end evaluate() (`{metric_key(EVAL_TRAIN, d.metric)}`): fit()'s number is "
                     "a running average over an epoch in which the weights moved. Nothing is "
                     "wrong; the gap shrinks as training converges.",
            "mode": "Nothing to fix: Dropout and batch statistics are meant for training only "
                    "(expected and harmless). evaluate() runs the model as it will be used, and "
                    f"is the number to compare with validation (`{metric_key(EVAL_TRAIN, d.metric)}`).",
            "none": "Nothing to do: fit() and evaluate() agree." if d.fit_known else
                    "Nothing to fix in the model's modes or BN statistics; pass fit()'s "
                    "`history=` to see how much drift adds.",
            "nonfinite": "Check the data for NaN/inf (`np.isfinite(x).all()`), lower the learning "
                         "rate or clip the gradients (`clipnorm=1.0` in the optimizer), and add "
                         "`keras.callbacks.TerminateOnNaN()` to stop such a run at once.",
        }[d.cause]

    @property
    def _recalibrating_helps(self):
        """Whether PreciseBN's statistics do better on the probe than the moving
        averages: a lower ``precise_bn`` (a higher one for an accuracy)."""
        d = self.evidence
        return d.parts["bn_ema"] > 0 if is_accuracy(d.metric) else d.parts["bn_ema"] < 0

    def table(self):
        """Header and rows of the table, as text cells (``-``: not measured)."""
        header = ["metric", *COLUMNS[:-1], "noise (SE)"]
        cells = []
        for row in self.rows:
            cells.append([row["metric"], *(_num(row[c]) for c in COLUMNS[:4]),
                          *(_num(row[c], sign=True) for c in ("gap", *PARTS)),
                          _num(row["noise"])])
        return header, cells

    @property
    def note(self):
        """How to read the table (probe, identity, noise)."""
        d = self.evidence
        n = d.probe_size or "n"
        at = "After fit()" if d.epoch is None else f"At epoch {d.epoch}"
        return (f"{at}, on {n} training samples (the probe). eval_train is evaluate() on "
                "them, train_mode the same weights in training mode, precise_bn with BN "
                "statistics recomputed on them. gap = fit - eval_train "
                "= drift + mode + bn_ema. Noise: the standard error (SE) of evaluate's number, "
                "std of the per-sample losses / sqrt(n) for the loss, sqrt(p (1 - p) / n) for an "
                f"accuracy p; a gap and parts within {_standard_errors(d.z)} are within noise.")

