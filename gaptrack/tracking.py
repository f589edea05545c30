"""Logging to MLflow that never stops training.

:class:`RunLogger` holds one run. Each epoch's metrics go out in one
``log_batch`` request (split in chunks of 1000, MLflow's limit), each table as
one artifact upload. When the tracking server cannot be reached, or a request
fails, the failure is reported as a :class:`TrackingWarning`, what was not logged
is kept, and it is sent again with the next epoch's data, in order, so the
server sees each point once. Nothing is raised into training.

This module knows MLflow and pandas, not Keras.
"""

import os
import shutil
import tempfile
import time
import warnings

#: MLflow's limit of metrics in one ``log_batch`` request.
MAX_METRICS_PER_BATCH = 1000


class TrackingWarning(UserWarning):
    """A tracking request failed; the data is kept and retried."""


class RunLogger:
    """One MLflow run's metrics, tags and tables, buffered and retried.

    Args:
        run_id: log to this run; by default the active run is joined, or a new
            one is started (and ended again by :meth:`close`).

    Example:
        >>> logger = RunLogger()
        >>> logger.log_metrics({"gap/loss": 0.12}, step=0)
        >>> logger.close()
    """

    def __init__(self, run_id=None):
        self.run_id = run_id
        self.owns_run = False
        self._client = None
        self._metrics = []
        self._tags = {}
        self._artifacts = []
        self._outbox = tempfile.mkdtemp(prefix="gaptrack-outbox-")
        self.failures = 0

    # -- run ---------------------------------------------------------------------

    def _ensure_run(self):
        import mlflow
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(mlflow.get_tracking_uri())
        if self.run_id is None:
            active = mlflow.active_run()
            if active is not None:
                self.run_id = active.info.run_id
            else:
                self.run_id = mlflow.start_run().info.run_id
                self.owns_run = True

    # -- queueing ----------------------------------------------------------------

    def log_metrics(self, metrics, step):
        """Queue ``{key: value}`` at ``step`` and send everything queued."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._metrics.extend(
            Metric(key, float(value), timestamp, int(step)) for key, value in metrics.items()
        )
        return self.flush()

    def set_tags(self, tags):
        """Queue tags (values made strings) and send everything queued."""
        self._tags.update({key: str(value) for key, value in tags.items()})
        return self.flush()

    def log_table(self, frame, artifact_path):
        """Queue a DataFrame as a Parquet artifact (``dir/name.parquet``)."""
        directory, name = os.path.split(artifact_path)
        local_dir = os.path.join(self._outbox, str(len(self._artifacts)))
        os.makedirs(local_dir)
        local = os.path.join(local_dir, name)
        frame.to_parquet(local, index=False)
        self._artifacts.append((local, directory or None))
        return self.flush()

    @property
    def pending(self):
        """Number of metric points, tags and artifacts not yet on the server."""
        return len(self._metrics) + len(self._tags) + len(self._artifacts)

    # -- sending -----------------------------------------------------------------

    def flush(self):
        """Send what is queued; return ``True`` when nothing is left."""
        try:
            self._ensure_run()
            while self._metrics:
                chunk = self._metrics[:MAX_METRICS_PER_BATCH]
                self._client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                del self._metrics[: len(chunk)]
            if self._tags:
                from mlflow.entities import RunTag

                self._client.log_batch(
                    self.run_id, tags=[RunTag(k, v) for k, v in self._tags.items()],
                    synchronous=True,
                )
                self._tags.clear()
            while self._artifacts:
                local, directory = self._artifacts[0]
                self._client.log_artifact(self.run_id, local, directory)
                shutil.rmtree(os.path.dirname(local), ignore_errors=True)
                self._artifacts.pop(0)
        except Exception as exc:  # noqa: BLE001 - a tracking failure never stops training
            self.failures += 1
            warnings.warn(
                f"gaptrack could not log to MLflow ({type(exc).__name__}: {exc}); "
                f"{self.pending} item(s) kept and retried with the next epoch",
                TrackingWarning,
                stacklevel=3,
            )
            return False
        return True

    def close(self):
        """Send what is left and end the run if this logger started it."""
        done = self.flush()
        if not done:
            warnings.warn(
                f"gaptrack could not log {self.pending} item(s) to MLflow run "
                f"{self.run_id}; artifacts not sent are kept in {self._outbox}",
                TrackingWarning,
                stacklevel=2,
            )
        if self.owns_run:
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                try:
                    mlflow.end_run()
                except Exception as exc:  # noqa: BLE001
                    warnings.warn(f"gaptrack could not end run {self.run_id}: {exc}",
                                  TrackingWarning, stacklevel=2)
        if done:
            shutil.rmtree(self._outbox, ignore_errors=True)
        return done
