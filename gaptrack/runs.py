"""Reading a tracked run back from MLflow: :func:`load_run` (its history as a
DataFrame, its report, its BN snapshots) and :func:`load_history` (what a
report is built from).

The run's tags and the metric histories gaptrack logged per epoch (one request
per key) are parsed back into records with :func:`gaptrack.keys.parse_records`,
the inverse of what the tracker logged; so a run read back gives the same
records, the same :meth:`TrackedRun.history` frame and the same
:class:`gaptrack.Report` as the tracker that logged it, whether it was logged
live or spooled offline and sent later by ``gaptrack sync``.
"""

from functools import cached_property

from gaptrack.keys import history_keys, measured_metrics, parse_records, records_frame
from gaptrack.record import RunHistory
from gaptrack.report import ReportError, build_report


class TrackedRun:
    """A run tracked by gaptrack, read back from the tracking server.

    Attributes:
        run: MLflow's ``Run`` (``.info``, ``.data.params``, ``.data.tags``...).
        tracking_uri: where it was read from.
    """

    def __init__(self, run, records, tracking_uri):
        self.run = run
        self.tracking_uri = tracking_uri
        self._records = records

    @property
    def run_id(self):
        return self.run.info.run_id

    @cached_property
    def run_history(self):
        """The :class:`gaptrack.record.RunHistory` the report is built from."""
        return RunHistory(run_id=self.run_id, run_name=self.run.info.run_name or self.run_id,
                          records=self._records, tags=dict(self.run.data.tags))

    @cached_property
    def history(self):
        """One row an epoch (index ``epoch``), one column a logged key
        (``fit/loss``, ``eval_train/loss``, ``gap/loss/drift``, ...): the same
        frame as the tracker's ``to_frame()``."""
        return records_frame(self._records)

    @cached_property
    def report(self):
        """The run's :class:`gaptrack.Report`, the one logged at train end."""
        return build_report(self.run_history)

    def bn_snapshots(self):
        """The run's BN snapshots (:func:`gaptrack.load_bn_snapshots`)."""
        from gaptrack.snapshots import load_bn_snapshots

        return load_bn_snapshots(self.run_id, self.tracking_uri)

    def __repr__(self):
        measured = sum(1 for r in self._records if r.parts)
        return (f"<gaptrack.TrackedRun {self.run_id} {self.run.info.run_name!r}: "
                f"{len(self._records)} epochs, {measured} measured, "
                f"diagnosis {self.report.diagnosis!r}>")

    def _repr_html_(self):
        return self.report._repr_html_()


def load_run(run_id, tracking_uri=None):
    """A run tracked by gaptrack, read back: its history, report and BN snapshots.

    Args:
        run_id: the MLflow run.
        tracking_uri: the tracking server or store; default: MLflow's
            (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).

    Returns:
        A :class:`TrackedRun`: ``.history`` (DataFrame), ``.report``,
        ``.bn_snapshots()``, ``.run``.

    Raises:
        ReportError: the server cannot be reached, the run does not exist, or
            it has no gap metrics (not tracked by gaptrack).

    Example:
        >>> run = gaptrack.load_run("1f2e...")
        >>> run.history[["fit/loss", "eval_train/loss", "gap/loss"]]
        >>> print(run.report)
    """
    return TrackedRun(*_read(run_id, tracking_uri))


def load_history(run_id, tracking_uri=None):
    """What the report of ``run_id`` is built from: a
    :class:`gaptrack.record.RunHistory` (raises as :func:`load_run`)."""
    return load_run(run_id, tracking_uri).run_history


def _read(run_id, tracking_uri):
    """``(run, records, tracking URI)`` of a run gaptrack tracked."""
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
    if not measured_metrics(logged):
        raise ReportError(
            f"run {run_id!r} has no gap/<metric> metrics: it was not tracked by gaptrack "
            "(GapTracker, gaptrack.autolog()), or it stopped before its first epoch ended"
        )
    metrics = {key: {p.step: p.value for p in client.get_metric_history(run_id, key)}
               for key in history_keys(logged)}
    return run, parse_records(metrics), uri
