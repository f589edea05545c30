"""Reading a tracked run back from MLflow, for a report rebuilt from the server.

:func:`load_history` reads the run's tags and the metric histories gaptrack
logged per epoch (one request per key) and parses them back into records with
:func:`gaptrack.keys.parse_records`, the inverse of what the tracker logged.
"""

from gaptrack.keys import history_keys, measured_metrics, parse_records
from gaptrack.record import RunHistory
from gaptrack.report import ReportError


def load_history(run_id, tracking_uri=None):
    """Read what the report of ``run_id`` needs from the tracking server.

    Args:
        run_id: the MLflow run.
        tracking_uri: the tracking server or store; default: MLflow's
            (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).

    Returns:
        A :class:`gaptrack.record.RunHistory`.

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
    if not measured_metrics(logged):
        raise ReportError(
            f"run {run_id!r} has no gap/<metric> metrics: it was not tracked by gaptrack "
            "(GapTracker, gaptrack.autolog()), or it stopped before its first epoch ended"
        )
    metrics = {key: {p.step: p.value for p in client.get_metric_history(run_id, key)}
               for key in history_keys(logged)}
    return RunHistory(run_id=run_id, run_name=run.info.run_name or run_id,
                      records=parse_records(metrics), tags=dict(run.data.tags))
