"""Logging to MLflow that never stops nor slows training, and loses nothing.

:class:`RunLogger` holds one run. Every call (metrics, tags, a table, a file, an
image, the description) becomes an *operation*, appended to the run's **spool**
on local disk (:mod:`gaptrack.spool`) and queued for the sender thread
(:mod:`gaptrack.sender`), which sends the operations in order. The training
thread only writes to local disk: the run is created, and every request made,
by the sender thread, so a slow, hung or absent server costs training nothing.

When requests fail, the sender issues a :class:`TrackingWarning` at once (once
per outage, at most 10 s after the failing request started) and retries with
backoff; one log line says when the server answers again. At train end
:meth:`RunLogger.close` waits at most ``close_timeout`` seconds for the queue to
drain; then the sender stops and what is left stays in the spool, with a warning
naming the ``gaptrack sync`` command that sends it later (:mod:`gaptrack.sync`).

**Guarantees.** Every operation is in the spool before it is sent and is removed
only once the server has acknowledged all operations, so no point is lost by a
crash of the server or of the training (``gaptrack sync`` ends the run of a
killed training as ``KILLED``); and every point reaches the server exactly once
in effect (see :mod:`gaptrack.sender`). When the spool's disk is full or
read-only, operations are kept in memory within a bound instead, and train end
says what could not be kept (:mod:`gaptrack.outbox`); nothing of it raises. Credentials are never
written to the spool: a tracking URI is stored without its user-info part, and
MLflow reads the credentials from its own environment variables when sending.

This module knows MLflow and pandas, not Keras.
"""

import bisect
import os
import re
import socket
import threading
import time
import uuid

from gaptrack.outbox import Outbox
from gaptrack.sender import BackgroundSender, TrackingWarning, warn_tracking
from gaptrack.spool import Spool, safe_relative, spool_root
from gaptrack.uris import check_tracking_uri, redact_uri

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "RunLogger", "TrackingWarning"]

#: Seconds :meth:`RunLogger.close` waits for the server at train end, by default.
DEFAULT_CLOSE_TIMEOUT = 30.0
#: What MLflow accepts as an image key (``MlflowClient.log_image``).
IMAGE_KEY = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")


def _now_ms():
    return int(time.time() * 1000)


class RunLogger:
    """One MLflow run's metrics, tags and artifacts: spooled, sent in the
    background, retried.

    No method waits on the network except :meth:`flush`, :meth:`wait_for_run`
    and :meth:`close`, each for at most the time it is given.

    Args:
        run_id: log to this run; by default the active run is joined, or a new
            run is created (by the sender thread) in the current experiment and
            ended by :meth:`close`.
        close_timeout: seconds :meth:`close` waits for the server.

    Example:
        >>> logger = RunLogger()
        >>> logger.log_metrics({"gap/loss": 0.12}, step=0)
        >>> logger.close()
    """

    def __init__(self, run_id=None, close_timeout=DEFAULT_CLOSE_TIMEOUT):
        import mlflow

        self.tracking_uri = mlflow.get_tracking_uri()
        check_tracking_uri(self.tracking_uri)
        self.close_timeout = close_timeout
        active = mlflow.active_run()
        self.owns_run = run_id is None and active is None
        run_id = run_id or (active and active.info.run_id)
        # the process ends the run it created or started (see gaptrack.sync)
        meta = {"tracking_uri": redact_uri(self.tracking_uri), "run_id": run_id,
                "start_time": _now_ms(), "host": socket.gethostname(), "pid": os.getpid(),
                "process_run": self.owns_run or run_id == (active and active.info.run_id)}
        if self.owns_run:
            meta.update(_experiment(), run_tags=_run_tags())
        self.spool = Spool(spool_root() / uuid.uuid4().hex)
        #: The spool, else memory (:mod:`gaptrack.outbox`).
        self.outbox = Outbox(self.spool, meta)
        #: Queueing is safe from any thread (the epoch images are queued from
        #: their rendering thread): one operation's slot, file and entry at a time.
        self._lock = threading.RLock()
        self._seq = 0
        self._submitted = []  # the seq of each operation given to the sender
        self._end_deadline = None
        self._sender = BackgroundSender(self.spool, meta, self.tracking_uri,
                                        self.outbox.refuse)

    @property
    def run_id(self):
        """The run's id: known from the start when a run is joined, else once the
        sender thread has created the run (``None`` until then, so, with the
        server away, possibly after :meth:`close`); kept after :meth:`close`."""
        return self._sender.sender.run_id

    def wait_for_run(self, timeout):
        """Wait at most ``timeout`` seconds for the run to exist on the server;
        ``(run_id, run_name)``, or ``None`` when it does not in time."""
        if self._sender.wait(lambda: self._sender.run_ready, timeout):
            return self._sender.sender.run_id, self._sender.sender.run_name
        return None

    # -- queueing ----------------------------------------------------------------

    def _enqueue(self, kind, data=None, name=None, **fields):
        """Keep an operation (``data``: the bytes of its file ``name``) and queue
        it for the sender."""
        with self._lock:
            op = {"seq": self._seq, "type": kind}
            if name is not None:
                op["path"] = f"files/{self._seq}/{name}"
            op.update(fields)
            self._seq += 1
            kept = self.outbox.keep(op, data, self._sender.sent)
            if kept is not None:
                self._submitted.append(op["seq"])
                self._sender.submit(kept)

    def log_metrics(self, metrics, step):
        """Queue ``{key: value}`` at ``step`` (one ``log_batch`` request)."""
        timestamp = _now_ms()
        self._enqueue("metrics", metrics=[
            [key, float(value), timestamp, int(step)] for key, value in metrics.items()])

    def set_tags(self, tags):
        """Queue tags (values made strings)."""
        self._enqueue("tags", tags={k: str(v) for k, v in tags.items()})

    def set_description(self, text):
        """Queue the run's description (the tag ``mlflow.note.content``, shown on
        the run's page). It is written only when, at send time, the run has no
        description, or the one gaptrack wrote before: a description the user
        wrote is kept."""
        self._enqueue("description", text=str(text))

    def log_table(self, frame, artifact_path):
        """Queue a DataFrame as a Parquet artifact at ``dir/name.parquet``."""
        directory, name = _split_artifact_path(artifact_path)
        self._enqueue("artifact", frame.to_parquet(None, index=False), name, dir=directory)

    def log_bytes(self, data, artifact_path):
        """Queue ``data`` (bytes, or text written as UTF-8) as the artifact
        ``dir/name``."""
        directory, name = _split_artifact_path(artifact_path)
        data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._enqueue("artifact", data, name, dir=directory)

    def log_image(self, image_bytes_png, key, step):
        """Queue a PNG image at ``step`` under ``key``, stored as
        ``mlflow.log_image(image, key=key, step=step)`` stores it, so that the
        MLflow UI's image chart for ``key`` steps through the steps."""
        if not IMAGE_KEY.match(key or ""):
            raise ValueError(f"image key must be letters, digits, '_', '-', '.', ' ' and "
                             f"'/', got {key!r}")
        name = step_image_name(key, int(step), _now_ms(), uuid.uuid4())
        self._enqueue("image", bytes(image_bytes_png), name, key=key, step=int(step))

    @property
    def pending(self):
        """Operations given to the sender and not yet acknowledged by the server."""
        return len(self._submitted) - bisect.bisect_right(self._submitted, self._sender.sent)

    # -- the end -----------------------------------------------------------------

    def flush(self, timeout=None):
        """Wait until everything queued is on the server, at most ``timeout``
        seconds (``None``: as long as the sender keeps trying); ``True`` if it is."""
        return self._sender.wait(lambda: self.pending == 0, timeout)

    def remaining_budget(self):
        """Seconds left of ``close_timeout`` for the end of training; the clock
        starts at the first call, so that all waits at train end together stay
        within the budget."""
        if self._end_deadline is None:
            self._end_deadline = time.monotonic() + self.close_timeout
        return max(self._end_deadline - time.monotonic(), 0.0)

    def close(self):
        """End the run (if this logger created it) and wait for the server, for
        what is left of ``close_timeout`` seconds; ``True`` when all was sent.

        Then the sender stops: what was not sent stays in the spool, handed over
        to ``gaptrack sync`` (a warning names the command) once the request in
        flight, if any, has ended. When the spool's disk refused writes, one
        warning says what could not be kept (:mod:`gaptrack.outbox`)."""
        self._enqueue("end", status="FINISHED" if self.owns_run else None,
                      end_time=_now_ms())
        done = self.flush(self.remaining_budget())
        lost = self.outbox.finish(self._sender.sent, self.run_id)
        self._sender.stop()
        kept = self.pending - lost
        if done:
            self.spool.remove()
        elif kept and self.spool.exists():
            why = self._sender.fatal or f"in {self.close_timeout:g} s"
            warn_tracking(f"gaptrack could not send {kept} item(s) to MLflow ({why}); they "
                          f"are kept in {self.spool.dir}: run `gaptrack sync {self.spool.dir}` "
                          "when the server accepts them")
        return done


def _experiment():
    """Where MLflow's fluent API would create the run, found without a request:
    the experiment set with ``mlflow.set_experiment``, else
    ``MLFLOW_EXPERIMENT_NAME`` (resolved or created by the sender), else
    ``MLFLOW_EXPERIMENT_ID``, else MLflow's default experiment."""
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
    from mlflow.tracking import fluent
    from mlflow.tracking.default_experiment import registry

    if fluent._active_experiment_id:
        return {"experiment_id": fluent._active_experiment_id}
    if MLFLOW_EXPERIMENT_NAME.get():
        return {"experiment_name": MLFLOW_EXPERIMENT_NAME.get()}
    return {"experiment_id": MLFLOW_EXPERIMENT_ID.get() or registry.get_experiment_id()}


def _run_tags():
    from mlflow.tracking.context.registry import resolve_tags

    return {k: str(v) for k, v in resolve_tags().items()}


def step_image_name(key, step, timestamp, unique):
    """The file name ``MlflowClient.log_image(run_id, image, key=key, step=step)``
    gives a step image under ``images/`` (the UI's image charts parse it back)."""
    return f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp}+{unique}.png"


def _split_artifact_path(path):
    directory, name = os.path.split(path)
    if not name or (directory and safe_relative(directory) is None):
        raise ValueError(f"artifact path must be a relative file path inside the run, "
                         f"got {path!r}")
    return directory or None, name
