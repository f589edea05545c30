"""The per-run report: why ``fit()`` and ``evaluate()`` disagree, in one sentence,
on a chart, and what to do about it.

The report is computed from what the run logged, so that it can be rebuilt at
any time from the tracking server:

- :func:`load_history` reads a run's tags and the metric histories the report
  needs (``fit/<m>``, ``eval_train/<m>``, ``gap/<m>`` and its parts,
  ``noise/loss``, ``bn/<layer>/{mean_lag,var_lag}``), one request per key;
- :func:`build_report` turns them into a :class:`Report`, with no MLflow and no
  Keras: the :class:`gaptrack.diagnosis.Diagnosis` of the loss, the sentence
  (what fit said, what evaluate says, which cause explains how much of the gap,
  against which noise), the remedy that fits the cause, a table of every
  metric, and two charts;
- :func:`log_report` is what :class:`gaptrack.GapTracker` calls at train end:
  it tags the diagnosis and logs the report under ``gaptrack/report/``:

  ``report.html``     the report, self-contained (the charts embedded as
                      ``data:`` URIs), so that the single file displays in the
                      MLflow UI's artifact browser or anywhere it is copied to
  ``report.md``       the same summary as Markdown
  ``decomposition.png``  per measured epoch, the three parts stacked (positive
                      parts above 0, negative below) and the gap as a line,
                      over the band of noise (one standard error)
  ``bn_staleness.png``  a heatmap, layers x epochs, of each BN layer's
                      ``mean_lag`` and ``var_lag`` (:mod:`gaptrack.bn`); only
                      when the model has BatchNormalization layers

``gaptrack report RUN_ID`` prints the same summary and can write the HTML.

Example:
    >>> from gaptrack.report import build_report, load_history
    >>> report = build_report(load_history(run_id))
    >>> print(report.sentence)
    >>> open("report.html", "w").write(report.html())
"""

import base64
import dataclasses
import html
import io
import math
import os
import re
import tempfile
import warnings
from functools import cached_property

from gaptrack.decompose import PARTS
from gaptrack.diagnosis import diagnose, first_nonfinite_epoch, standard_error

REPORT_DIR = "gaptrack/report"
_LAGS = ("mean_lag", "var_lag")
#: What each cause is, in the words of the sentence.
_WHAT = {
    "drift": "fit() averages the loss of every batch taken before its update, "
             "while the weights moved during the epoch",
    "mode": "Dropout and BatchNormalization's batch statistics act in fit(), "
            "not in evaluate()",
    "bn_ema": "BatchNormalization's moving averages lag behind the statistics its layers see",
}
_COLORS = {"drift": "#4C72B0", "mode": "#DD8452", "bn_ema": "#55A868"}


class ReportError(LookupError):
    """No report can be made for the run asked for; the message says why."""


class ReportWarning(UserWarning):
    """The report could not be logged at train end (training goes on)."""


@dataclasses.dataclass
class RunHistory:
    """What a run logged that the report needs.

    Attributes:
        run_id, run_name: the run.
        metrics: ``{key: {epoch: value}}``.
        tags: the run's tags.
    """

    run_id: str
    run_name: str
    metrics: dict
    tags: dict

    @property
    def names(self):
        """The measured metrics (those with ``gap/<m>``), the loss first."""
        return _measured(self.metrics)

    @property
    def probe_size(self):
        size = self.tags.get("gaptrack.probe_size")
        return int(size) if size else None

    @property
    def bn_layers(self):
        """The BN layer keys with logged staleness, in natural order (``bn_2`` before ``bn_10``)."""
        layers = {key[len("bn/"):-len("/mean_lag")] for key in self.metrics
                  if key.startswith("bn/") and key.endswith("/mean_lag")}
        return sorted(layers, key=lambda name: [int(t) if t.isdigit() else t
                                                for t in re.split(r"(\d+)", name)])


def _measured(keys):
    """The metrics ``m`` with ``gap/<m>`` and ``gap/<m>/drift`` among ``keys``, the loss first."""
    names = [key[len("gap/"):] for key in keys
             if key.startswith("gap/") and f"{key}/drift" in keys]
    return sorted(names, key=lambda m: (m != "loss", m))


def load_history(run_id, tracking_uri=None):
    """Read what the report of ``run_id`` needs from the tracking server.

    Args:
        run_id: the MLflow run.
        tracking_uri: the tracking server or store; default: MLflow's
            (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).

    Returns:
        A :class:`RunHistory`.

    Raises:
        ReportError: the server cannot be reached, the run does not exist, or
            it has no gap metrics (not tracked by gaptrack).
    """
    from mlflow.exceptions import MlflowException

    from gaptrack.uris import TrackingURIError, open_client, redact_uri

    try:
        client, uri = open_client(tracking_uri)
    except TrackingURIError as e:
        raise ReportError(str(e)) from None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(f"run {run_id!r} not found at tracking URI {redact_uri(uri)}") from None
    logged = run.data.metrics
    names = _measured(logged)
    if not names:
        raise ReportError(
            f"run {run_id!r} has no gap/<metric> metrics: it was not tracked by gaptrack "
            "(GapTracker, gaptrack.autolog()), or it stopped before its first epoch ended"
        )
    keys = [f"{prefix}/{m}" for m in names for prefix in ("fit", "eval_train", "gap")]
    keys += [f"gap/{m}/{part}" for m in names for part in PARTS]
    keys += ["noise/loss"]
    keys += [k for k in logged if k.startswith("bn/") and k.rpartition("/")[2] in _LAGS]
    metrics = {key: {p.step: p.value for p in client.get_metric_history(run_id, key)}
               for key in keys if key in logged}
    return RunHistory(run_id=run_id, run_name=run.info.run_name or run_id,
                      metrics=metrics, tags=dict(run.data.tags))


def build_report(history):
    """The :class:`Report` of a run's history (no MLflow, no Keras).

    The loss decides the diagnosis (:func:`gaptrack.diagnosis.diagnose`); every
    measured metric gets a row of the table, at the diagnosed epoch.
    """
    names = history.names
    if not names:
        raise ReportError(f"run {history.run_id!r} has no gap/<metric> metrics to report")
    diagnosis = diagnose(history.metrics, names[0], probe_size=history.probe_size)
    return Report(history, diagnosis)


def log_report(logger, history):
    """Tag the diagnosis and log the report of the run ``logger`` writes to.

    Called by the tracker at train end with ``history``, its own copy of what it
    logged (the same points the server gets, so the report is the one
    ``gaptrack report RUN_ID`` rebuilds from the server). It waits (within the
    logger's ``close_timeout`` budget, shared with the rest of the end of
    training) for the run to be on the server, for the run's id and name; when
    it is not in time, the report says so and waits in the spool with the rest.
    The tags and files are queued on the logger like any other (spooled,
    retried). Nothing is raised: when the report fails, a :class:`ReportWarning`
    says so and training ends as it would have.

    Args:
        logger: the run's :class:`gaptrack.tracking.RunLogger`.
        history: a :class:`RunHistory` of what the tracker logged.

    Returns:
        The :class:`Report`, or ``None`` when it could not be made.
    """
    if logger.flush(logger.remaining_budget()) and logger.run_id is not None:
        history = dataclasses.replace(history, run_id=logger.run_id,
                                      run_name=_run_name(logger) or logger.run_id)
    try:
        report = build_report(history)
        artifacts = report.artifacts()
    except Exception as exc:  # noqa: BLE001 - a report failure never stops training
        warnings.warn(f"gaptrack could not make the report of run {history.run_id} "
                      f"({type(exc).__name__}: {exc})", ReportWarning, stacklevel=2)
        return None
    logger.set_tags(report.diagnosis.tags)
    with tempfile.TemporaryDirectory(prefix="gaptrack-report-") as tmp:
        for name, data in artifacts.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            logger.log_artifact(path, REPORT_DIR)  # copied into the logger's spool
    return report


def _run_name(logger):
    """The run's name on the server (one request), or ``None``."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(logger.tracking_uri).get_run(logger.run_id).info.run_name
    except Exception:  # noqa: BLE001 - the title falls back to the run id
        return None


def _num(value, sign=False):
    """A number as the report prints it: 4 significant digits (``+`` for a
    difference when ``sign``), ``nan``/``inf`` as such."""
    return f"{value:+.4g}" if sign and math.isfinite(value) else f"{value:.4g}"


def _errors(z):
    return f"{z:g} standard error" + ("" if z == 1 else "s")


class Report:
    """The report of one run: :attr:`sentence`, :attr:`remedy`, :attr:`rows`,
    and renderings (:meth:`markdown`, :meth:`html`, :meth:`artifacts`).

    Args:
        history: the run's :class:`RunHistory`.
        diagnosis: its :class:`gaptrack.diagnosis.Diagnosis`.
    """

    def __init__(self, history, diagnosis):
        self.history = history
        self.diagnosis = diagnosis

    @property
    def rows(self):
        """One dict per measured metric, at the diagnosed epoch: ``metric``,
        ``fit``, ``eval_train``, ``gap``, ``drift``, ``mode``, ``bn_ema``,
        ``noise`` (standard error, ``None`` when there is none)."""
        epoch, logged = self.diagnosis.epoch, self.history.metrics
        rows = []
        for m in self.history.names:
            row = {"metric": m}
            for column, key in (("fit", f"fit/{m}"), ("eval_train", f"eval_train/{m}"),
                                ("gap", f"gap/{m}"), *((p, f"gap/{m}/{p}") for p in PARTS)):
                row[column] = logged.get(key, {}).get(epoch, math.nan)
            row["noise"] = standard_error(logged, m, epoch, self.history.probe_size)
            rows.append(row)
        return rows

    @property
    def sentence(self):
        """Why fit and evaluate disagree, with the numbers, in one sentence."""
        d = self.diagnosis
        m = d.metric
        measured = d.epoch in self.history.metrics.get(f"eval_train/{m}", {})
        says = (f"evaluate() on the training data says {_num(d.eval_train)}" if measured
                else "evaluate() was not measured that epoch")
        if d.cause == "nonfinite":
            return (f"At epoch {d.epoch}, fit() reported {m} {_num(d.fit)} and {says}: the {m} "
                    f"became non-finite (NaN or inf) at epoch {d.epoch}, so from then on there is "
                    "no gap to explain.")
        n = f"{d.probe_size} samples" if d.probe_size else "the probe"
        noise = f"±{_num(d.threshold)} ({_errors(d.z)} on {n})"
        head = f"At epoch {d.epoch}, fit() reported {m} {_num(d.fit)} and {says}: "
        parts = ", ".join(f"{p} {_num(d.parts[p], sign=True)}" for p in PARTS)
        if d.cause == "none":
            within = ("within the noise of the measurement, " + noise if d.noise is not None
                      else "exactly 0")
            return (head + f"the gap, {_num(d.gap, sign=True)}, and its parts ({parts}) are "
                    f"{within}, so the two agree.")
        part = d.parts[d.cause]
        share = f" ({100 * part / d.gap:.0f}% of it)" if d.gap and part / d.gap > 0 else ""
        others = " and ".join(f"{p} {_num(d.parts[p], sign=True)}" for p in PARTS if p != d.cause)
        noise = f"a noise of {noise}" if d.noise is not None else f"no error bar for {m}"
        return (head + f"a gap of {_num(d.gap, sign=True)} (fit - evaluate), of which "
                f"{d.cause}, because {_WHAT[d.cause]}, explains {_num(part, sign=True)}{share}, "
                f"against {others}, and {noise}.")

    @property
    def remedy(self):
        """What to do about it (Markdown: code in backticks)."""
        d, tags = self.diagnosis, self.history.tags
        if d.cause == "bn_ema":
            batch = tags.get("gaptrack.batch_size", "<fit's batch_size>")
            worst = tags.get("gaptrack.bn_worst_layer")
            return ("Recompute the BN statistics before evaluating or saving the model: "
                    f"`gaptrack.recalibrate_bn(model, (x_train, y_train), batch_size={batch})` "
                    "(PreciseBN); or train more steps, or lower the BatchNormalization momentum "
                    "(e.g. `BatchNormalization(momentum=0.9)`) so that the moving averages keep "
                    "up." + (f" The stalest layer is `{worst}`." if worst else ""))
        return {
            "drift": f"Trust the epoch-end evaluate() (`eval_train/{d.metric}`): fit()'s number is "
                     "a running average over an epoch in which the weights moved. Nothing is "
                     "wrong; the gap shrinks as training converges.",
            "mode": "Nothing to fix: Dropout and batch statistics are meant for training only "
                    "(expected and harmless). evaluate() runs the model as it will be used, and "
                    f"is the number to compare with validation (`eval_train/{d.metric}`).",
            "none": "Nothing to do: fit() and evaluate() agree.",
            "nonfinite": "Check the data for NaN/inf (`np.isfinite(x).all()`), lower the learning "
                         "rate or clip the gradients (`clipnorm=1.0` in the optimizer), and add "
                         "`keras.callbacks.TerminateOnNaN()` to stop such a run at once.",
        }[d.cause]

    # -- renderings --------------------------------------------------------------

    def _table(self):
        """Header and rows of the table, as text cells."""
        header = ["metric", "fit", "evaluate", "gap", *PARTS, "noise (SE)"]
        cells = []
        for row in self.rows:
            cells.append([row["metric"], _num(row["fit"]), _num(row["eval_train"]),
                          *(_num(row[c], sign=True) for c in ("gap", *PARTS)),
                          "-" if row["noise"] is None else _num(row["noise"])])
        return header, cells

    def _note(self):
        d = self.diagnosis
        n = d.probe_size or "n"
        return (f"At epoch {d.epoch}, on {n} training samples (the probe). gap = fit - evaluate "
                "= drift + mode + bn_ema. Noise: the standard error (SE) of evaluate's number, "
                "std of the per-sample losses / sqrt(n) for the loss, sqrt(p (1 - p) / n) for an "
                f"accuracy p; a gap and parts within {_errors(d.z)} are within noise.")

    @cached_property
    def images(self):
        """``{file name: PNG bytes}``: the decomposition, and BN staleness when there is BN."""
        images = {"decomposition.png": _png(decomposition_figure(self.history))}
        if self.history.bn_layers:
            images["bn_staleness.png"] = _png(staleness_figure(self.history))
        return images

    def markdown(self, images=True):
        """The summary as Markdown; ``images`` links the PNGs (beside it in the artifacts)."""
        header, cells = self._table()
        lines = [f"# Why fit() and evaluate() disagree: run {self.history.run_name}", "",
                 f"**Diagnosis: `{self.diagnosis.cause}`** (run `{self.history.run_id}`)", "",
                 self.sentence, "", f"**What to do:** {self.remedy}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        lines += ["", self._note()]
        if images:
            lines += ["", *(f"![{name[:-4]}]({name})" for name in self.images)]
        return "\n".join(lines) + "\n"

    def text(self):
        """The summary for a terminal: the Markdown without the image links."""
        return self.markdown(images=False)

    def html(self):
        """A self-contained HTML page: the charts are embedded as ``data:`` URIs."""
        e = html.escape
        header, cells = self._table()
        table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in cells) + "</table>")
        figures = "".join(
            f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">'
            for name, data in self.images.items()
            for title in [{"decomposition.png": "The gap per epoch, by cause",
                           "bn_staleness.png": "BN staleness per layer and epoch"}[name]]
        )
        title = f"Why fit() and evaluate() disagree: run {self.history.run_name}"
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }}
.diagnosis {{ font-size: 1.2rem; }} .diagnosis strong {{ background: #fde9b5;
       padding: 0 .3rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
code {{ background: #f3f3f3; padding: 0 .2rem; }} img {{ max-width: 100%; }}
.note {{ color: #555; font-size: .9rem; }}
</style></head><body>
<h1>{e(title)}</h1>
<p class="diagnosis">Diagnosis: <strong>{e(self.diagnosis.cause)}</strong>
 <span class="note">(run <code>{e(self.history.run_id)}</code>)</span></p>
<p class="sentence">{e(self.sentence)}</p>
<p class="remedy"><b>What to do:</b> {_code(e(self.remedy))}</p>
{table}
<p class="note">{e(self._note())}</p>
{figures}
</body></html>
"""

    def artifacts(self):
        """``{file name: bytes or str}``: what :func:`log_report` logs."""
        return {"report.html": self.html(), "report.md": self.markdown(), **self.images}


def _code(escaped):
    """Markdown backticks as ``<code>`` in already escaped HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


# -- charts ----------------------------------------------------------------------


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _finite(values):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def decomposition_figure(history):
    """One panel per measured metric: the parts stacked per epoch, the gap as a
    line, the noise (one standard error either side of 0) as a band."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    names = history.names
    figure = Figure(figsize=(9, 3.2 * len(names)), layout="constrained")
    for axes, m in zip(figure.subplots(len(names), 1, squeeze=False)[:, 0], names):
        logged = history.metrics
        epochs = sorted(logged[f"gap/{m}"])
        up, down = np.zeros(len(epochs)), np.zeros(len(epochs))
        for part in PARTS:
            values = np.nan_to_num(_finite([logged.get(f"gap/{m}/{part}", {}).get(e, np.nan)
                                            for e in epochs]))
            positive, negative = np.maximum(values, 0), np.minimum(values, 0)
            axes.bar(epochs, positive, bottom=up, width=0.6, color=_COLORS[part], label=part)
            axes.bar(epochs, negative, bottom=down, width=0.6, color=_COLORS[part])
            up, down = up + positive, down + negative
        noise = [standard_error(logged, m, e, history.probe_size) for e in epochs]
        if any(s is not None for s in noise):
            # a flat band across each epoch's bar: x from e - 0.5 to e + 0.5
            band = np.repeat(_finite([np.nan if s is None else s for s in noise]), 2)
            edges = np.ravel([(e - 0.5, e + 0.5) for e in epochs])
            axes.fill_between(edges, -band, band, color="grey", alpha=0.25, linewidth=0,
                              zorder=0, label="noise (±1 SE)")
        axes.plot(epochs, _finite([logged[f"gap/{m}"][e] for e in epochs]), color="black",
                  marker="o", label="gap = fit - evaluate")
        first = first_nonfinite_epoch(logged, m)
        if first is not None:
            axes.axvline(first, color="red", linestyle="--", label=f"{m} non-finite from here")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.use_sticky_edges = False  # stacked bars pin the limits to their ends
        axes.margins(y=0.08)
        axes.set_xlim(epochs[0] - 0.6, epochs[-1] + 0.6)
        if len(epochs) <= 12:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(f"{m}: fit - evaluate")
        axes.set_title(f"{m}: gap between fit() and evaluate(), by cause")
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def staleness_figure(history):
    """Heatmaps, BN layers x measured epochs, of ``mean_lag`` and ``var_lag``."""
    import numpy as np
    from matplotlib.figure import Figure

    layers = history.bn_layers
    logged = history.metrics
    epochs = sorted({e for layer in layers for e in logged[f"bn/{layer}/mean_lag"]})
    figure = Figure(figsize=(10, 1.6 + 0.28 * len(layers)), layout="constrained")
    titles = {"mean_lag": "mean_lag: |moving_mean - mean| / std",
              "var_lag": "var_lag: |log moving_variance - log variance|"}
    for axes, lag in zip(figure.subplots(1, 2, sharey=True), _LAGS):
        grid = _finite([[logged.get(f"bn/{layer}/{lag}", {}).get(e, np.nan) for e in epochs]
                        for layer in layers])
        image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis",
                            interpolation="nearest")
        step = max(1, len(epochs) // 10)
        axes.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        axes.set_yticks(range(len(layers)), layers, fontsize="small")
        axes.set_xlabel("epoch")
        axes.set_title(titles[lag], fontsize="medium")
        figure.colorbar(image, ax=axes)
    figure.suptitle("BN staleness: moving statistics vs the probe's population statistics")
    return figure
