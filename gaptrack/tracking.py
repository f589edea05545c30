"""Logging to MLflow that never stops training, and loses nothing.

:class:`RunLogger` holds one run. Every call (metrics, tags, a table, a file)
becomes an *operation*, written first to a **spool** directory on local disk and
then sent by a background thread, in order, one request per operation: an
epoch's metrics are one ``log_batch`` (split in chunks of 1000, MLflow's limit),
a table one artifact upload. So training never waits on the tracking server.

When a request fails (server down, restarting, refusing), the sender reports a
:class:`TrackingWarning` (raised in the training thread at its next call, never
as an exception) and retries the same operation with backoff, keeping the order.
At train end :meth:`RunLogger.close` waits at most ``close_timeout`` seconds (the
retry budget) for the queue to drain. What could still not be sent stays in the
spool, and ``gaptrack sync`` (:func:`sync`) sends it later, creating the run if
the server was never reachable.

**Guarantees.** Every operation is in the spool before it is sent and is removed
only once the server has acknowledged all operations, so no point is lost by a
crash of the server or of the training. Delivery is at-least-once, and the
server makes it exactly-once in effect: MLflow ignores a metric point identical
to one it has (same key, value, timestamp and step; each point's timestamp is
fixed when it is spooled), tags are overwritten with the same value, and an
artifact re-uploaded to the same path replaces itself. So :func:`sync` run twice,
or a retry of a request whose answer was lost, adds nothing.

**Where.** The spool is ``$GAPTRACK_SPOOL_DIR`` if set, else
``$XDG_STATE_HOME/gaptrack/spool`` (``~/.local/state/gaptrack/spool``), one
sub-directory per run; it is deleted once everything is on the server.
Credentials are never written to it: a tracking URI is stored without its
user-info part, and MLflow reads the credentials from its own environment
variables (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) when sending.

This module knows MLflow and pandas, not Keras.
"""

import json
import os
import queue
import re
import shutil
import threading
import time
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

#: Environment variable naming the spool directory.
SPOOL_ENV = "GAPTRACK_SPOOL_DIR"
#: Seconds :meth:`RunLogger.close` waits for the server at train end, by default.
DEFAULT_CLOSE_TIMEOUT = 30.0
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


class TrackingWarning(UserWarning):
    """A tracking request failed; the data is kept and retried."""


class SyncError(RuntimeError):
    """A spool directory cannot be synchronised; the message says why."""


class TrackingURIError(ValueError):
    """The tracking URI is malformed; the message says what is accepted."""


_URI_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                "databricks")


def check_tracking_uri(uri):
    """Raise :class:`TrackingURIError` unless ``uri`` has a form MLflow can use.

    Accepted: ``http(s)://host[:port]``, ``sqlite:///path``,
    ``postgresql://...``/``mysql://...``/``mssql://...`` (with an optional
    ``+driver``), ``file:...`` and ``databricks``. Whether the server answers is
    not checked here: an unreachable server is spooled for, not refused.
    """
    parts = urllib.parse.urlsplit(uri or "")
    scheme = "databricks" if uri == "databricks" else parts.scheme.split("+")[0]
    accepted = ("accepted: http(s)://host:port, sqlite:///path/to/mlflow.db, "
                "postgresql://user@host/db (or mysql, mssql), file:/path, databricks")
    if scheme not in _URI_SCHEMES:
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} has no usable scheme; {accepted}")
    if scheme in ("http", "https") and not parts.hostname:
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} names no host; {accepted}")
    if scheme == "sqlite" and not parts.path.strip("/"):
        raise TrackingURIError(f"tracking URI {redact_uri(uri)!r} names no database file; "
                               f"{accepted}")


def _http_status(exc):
    getter = getattr(exc, "get_http_status_code", None)
    try:
        return int(getter()) if getter else None
    except (TypeError, ValueError):
        return None


_CREDENTIALS = re.compile(r"(//)[^/@\s]+@")


def describe_failure(exc):
    """One line on a failed request; ``(text, permanent)``.

    A refusal (HTTP 4xx but 429) will not go away by retrying: bad or missing
    credentials, a deleted run. Anything else (connection refused, timeouts,
    5xx) may.
    """
    status = _http_status(exc)
    # MLflow's messages quote the request URL, credentials included.
    first_line = _CREDENTIALS.sub(r"\1", str(exc).splitlines()[0] if str(exc) else "")
    text = f"{type(exc).__name__}: {first_line}"
    if status in (401, 403):
        return (f"the tracking server refused the request (HTTP {status}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to credentials "
                "it accepts", True)
    if status is not None and 400 <= status < 500 and status != 429:
        return f"the tracking server refused the request (HTTP {status}): {text}", True
    return text, False


def spool_root():
    """The directory under which runs are spooled (see the module docstring)."""
    configured = os.environ.get(SPOOL_ENV)
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return Path(state) / "gaptrack" / "spool"


def redact_uri(uri):
    """``uri`` without a ``user:password@`` part."""
    parts = urllib.parse.urlsplit(uri or "")
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _safe_relative(path):
    """``path`` if it is relative and stays below its base, else ``None``."""
    if not path:
        return None
    pure = Path(path)
    if pure.is_absolute() or ".." in pure.parts or path.startswith(("/", "\\")):
        return None
    return path


class Spool:
    """One run's operations on disk: ``meta.json``, ``ops.jsonl``, ``acked`` and
    the files of artifact operations under ``files/``."""

    def __init__(self, directory):
        self.dir = Path(directory)

    @classmethod
    def create(cls, meta):
        root = spool_root()
        spool = cls(root / uuid.uuid4().hex)
        (spool.dir / "files").mkdir(parents=True)
        spool.write_meta(meta)
        return spool

    def read_meta(self):
        return json.loads((self.dir / "meta.json").read_text())

    def write_meta(self, meta):
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / "meta.json")

    def append(self, op):
        with open(self.dir / "ops.jsonl", "a") as f:
            f.write(json.dumps(op) + "\n")

    def ops(self):
        path = self.dir / "ops.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def acked(self):
        path = self.dir / "acked"
        return int(path.read_text()) if path.exists() else -1

    def ack(self, seq):
        tmp = self.dir / "acked.tmp"
        tmp.write_text(str(seq))
        os.replace(tmp, self.dir / "acked")

    def file(self, relative):
        safe = _safe_relative(relative)
        if safe is None or not safe.startswith("files/"):
            raise SyncError(f"spool {self.dir} names a file outside it: {relative!r}")
        return self.dir / safe

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class _Sender:
    """Sends one spool's operations to MLflow, in order."""

    def __init__(self, spool, tracking_uri):
        from mlflow.tracking import MlflowClient

        self.spool = spool
        self.client = MlflowClient(tracking_uri)

    def run_id(self):
        meta = self.spool.read_meta()
        if meta.get("run_id") is None:
            experiment_id = meta.get("experiment_id")
            if experiment_id is None:
                name = meta.get("experiment_name")
                experiment = self.client.get_experiment_by_name(name) if name else None
                experiment_id = (experiment.experiment_id if experiment
                                 else self.client.create_experiment(name) if name else "0")
            run = self.client.create_run(experiment_id, tags=meta.get("run_tags") or {},
                                         run_name=meta.get("run_name"))
            meta["run_id"] = run.info.run_id
            self.spool.write_meta(meta)
        return meta["run_id"]

    def send(self, op):
        from mlflow.entities import Metric, RunTag

        run_id = self.run_id()
        kind = op["type"]
        if kind == "metrics":
            # MLflow's client splits it into requests of at most 1000 metrics
            self.client.log_batch(run_id, synchronous=True, metrics=[
                Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]])
        elif kind == "tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()],
                                  synchronous=True)
        elif kind == "artifact":
            directory = op.get("dir")
            if directory is not None and _safe_relative(directory) is None:
                raise SyncError(f"artifact directory {directory!r} is not a relative path")
            self.client.log_artifact(run_id, str(self.spool.file(op["path"])), directory)
        elif kind == "end":
            self.client.set_terminated(run_id, op["status"])
        else:
            raise SyncError(f"unknown operation {kind!r} in {self.spool.dir}")


class RunLogger:
    """One MLflow run's metrics, tags and artifacts: spooled, sent in the
    background, retried.

    Args:
        run_id: log to this run; by default the active run is joined, or a new
            run is created in the current experiment (and ended by :meth:`close`).
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
        self.owns_run = False
        if run_id is None and mlflow.active_run() is not None:
            run_id = mlflow.active_run().info.run_id
        meta = {"tracking_uri": redact_uri(self.tracking_uri), "run_id": run_id}
        if run_id is None:
            from mlflow.tracking.context.registry import resolve_tags
            from mlflow.tracking.fluent import _get_experiment_id

            self.owns_run = True
            try:
                meta["experiment_id"] = _get_experiment_id()
            except Exception:  # noqa: BLE001 - the name is resolved when sending
                meta["experiment_name"] = os.environ.get("MLFLOW_EXPERIMENT_NAME")
            meta["run_tags"] = {k: str(v) for k, v in resolve_tags().items()}
        self.spool = Spool.create(meta)
        self._sender = _Sender(self.spool, self.tracking_uri)
        self._seq = 0
        self._sent = -1
        self._errors = []
        self._failing = False
        self._fatal = None
        self._queue = queue.Queue()
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gaptrack-logger", daemon=True)
        self._thread.start()
        if self.owns_run:
            self._try_create_run()

    # -- the run -----------------------------------------------------------------

    def _try_create_run(self):
        """Create the run now when the server answers quickly, so its id is known."""
        if not _reachable(self.tracking_uri):
            self._errors.append(f"tracking server {redact_uri(self.tracking_uri)} unreachable")
            return
        try:
            self._sender.run_id()
        except Exception as exc:  # noqa: BLE001 - the sender retries it
            self._errors.append(describe_failure(exc)[0])

    @property
    def run_id(self):
        """The run's id (``None`` while it could not be created)."""
        return self.spool.read_meta().get("run_id") if self.spool.dir.exists() else self._run_id

    _run_id = None

    # -- queueing ----------------------------------------------------------------

    def _enqueue(self, op):
        self._report()
        op["seq"] = self._seq
        self._seq += 1
        self.spool.append(op)
        self._queue.put(op)

    def log_metrics(self, metrics, step):
        """Queue ``{key: value}`` at ``step`` (one ``log_batch`` request)."""
        timestamp = int(time.time() * 1000)
        self._enqueue({"type": "metrics", "metrics": [
            [key, float(value), timestamp, int(step)] for key, value in metrics.items()]})

    def set_tags(self, tags):
        """Queue tags (values made strings)."""
        self._enqueue({"type": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_table(self, frame, artifact_path):
        """Queue a DataFrame as a Parquet artifact at ``dir/name.parquet``."""
        directory, name = _split_artifact_path(artifact_path)
        target = self._file_slot(name)
        frame.to_parquet(target, index=False)
        self._enqueue({"type": "artifact", "path": str(target.relative_to(self.spool.dir)),
                       "dir": directory})

    def log_artifact(self, local_path, artifact_dir=None):
        """Queue a copy of a local file as an artifact under ``artifact_dir``."""
        if artifact_dir is not None and _safe_relative(artifact_dir) is None:
            raise ValueError(f"artifact_dir must be a relative path inside the run, "
                             f"got {artifact_dir!r}")
        target = self._file_slot(os.path.basename(local_path))
        shutil.copyfile(local_path, target)
        self._enqueue({"type": "artifact", "path": str(target.relative_to(self.spool.dir)),
                       "dir": artifact_dir})

    def _file_slot(self, name):
        slot = self.spool.dir / "files" / str(self._seq)
        slot.mkdir(parents=True)
        return slot / name

    @property
    def pending(self):
        """Operations not yet acknowledged by the server."""
        return self._seq - 1 - self._sent

    # -- sending -----------------------------------------------------------------

    def _work(self):
        while True:
            op = self._queue.get()
            if op is None:
                return
            attempt = 0
            while True:
                try:
                    self._sender.send(op)
                    break
                except Exception as exc:  # noqa: BLE001 - never raised into training
                    text, permanent = describe_failure(exc)
                    self._errors.append(text)
                    if permanent:
                        # Retrying cannot help: keep the rest in the spool.
                        with self._idle:
                            self._fatal = text
                            self._idle.notify_all()
                        return
                    if self._stop.is_set():
                        return
                    self._stop.wait(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
                    attempt += 1
            self.spool.ack(op["seq"])
            with self._idle:
                self._sent = op["seq"]
                self._idle.notify_all()

    def _report(self):
        """Turn the sender's failures into one warning in the calling thread."""
        if self._errors:
            last = self._errors[-1]
            self._errors.clear()
            if not self._failing:
                warnings.warn(
                    f"gaptrack could not log to MLflow ({last}); {self.pending} item(s) "
                    "kept and retried in the background",
                    TrackingWarning, stacklevel=4)
            self._failing = True
        elif self._failing and self.pending == 0:
            self._failing = False

    def flush(self, timeout=None):
        """Wait until everything queued is on the server; ``True`` if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self.pending > 0 and self._fatal is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(remaining)
        self._report()
        return self.pending == 0

    def remaining_budget(self):
        """Seconds left of ``close_timeout`` for the end of training; the clock
        starts at the first call, so that all waits at train end together stay
        within the budget."""
        if self._end_deadline is None:
            self._end_deadline = time.monotonic() + self.close_timeout
        return max(self._end_deadline - time.monotonic(), 0.0)

    _end_deadline = None

    def wait_for_run(self, timeout):
        """Wait at most ``timeout`` s for what is queued to reach the server;
        ``(run_id, run_name)``, or ``None`` when the run is not there in time."""
        if not self.flush(timeout) or self.run_id is None:
            return None
        from mlflow.tracking import MlflowClient

        try:
            name = MlflowClient(self.tracking_uri).get_run(self.run_id).info.run_name
        except Exception:  # noqa: BLE001 - the title falls back to the run id
            name = None
        return self.run_id, name or self.run_id

    def close(self):
        """End the run (if this logger created it) and wait for the server, for
        what is left of ``close_timeout`` seconds; ``True`` when all was sent.

        What was not sent stays in the spool with a warning naming the
        ``gaptrack sync`` command that sends it later."""
        if self.owns_run:
            self._enqueue({"type": "end", "status": "FINISHED"})
        done = self.flush(self.remaining_budget())
        self._stop.set()
        self._queue.put(None)
        if done:
            self._run_id = self.run_id
            self.spool.remove()
        else:
            why = self._fatal or f"in {self.close_timeout:g} s"
            warnings.warn(
                f"gaptrack could not send {self.pending} item(s) to MLflow ({why}); they "
                f"are kept in {self.spool.dir}: run `gaptrack sync {self.spool.dir}` when "
                "the server accepts them",
                TrackingWarning, stacklevel=2)
        return done


def _split_artifact_path(path):
    directory, name = os.path.split(path)
    if not name or (directory and _safe_relative(directory) is None):
        raise ValueError(f"artifact path must be a relative file path inside the run, "
                         f"got {path!r}")
    return directory or None, name


def _reachable(uri, timeout=3.0):
    """Whether an HTTP tracking server answers ``/health`` quickly (non-HTTP
    stores are local: always)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def open_client(tracking_uri=None, timeout=10.0):
    """An ``MlflowClient`` for ``tracking_uri`` (default: MLflow's current one),
    after checking that the URI is well formed, that an HTTP server answers and
    that a SQLite file exists: a wrong URI is one clear :class:`TrackingURIError`
    instead of minutes of retries or a new, empty store.

    Returns:
        ``(client, uri)``.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_uri(uri)
    where = ("pass a running server or an existing store with --tracking-uri or "
             "MLFLOW_TRACKING_URI")
    if not _reachable(uri, timeout=timeout):
        raise TrackingURIError(f"tracking server {redact_uri(uri)} is unreachable; {where}")
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        path = make_url(uri).database
        if path and path != ":memory:" and not os.path.exists(path):
            raise TrackingURIError(f"tracking store {uri} does not exist (no file {path}); "
                                   f"{where}")
    return MlflowClient(uri), uri


def sync(path=None, tracking_uri=None):
    """Send spooled operations that did not reach the server.

    Args:
        path: one run's spool directory, or a directory of them; default
            :func:`spool_root`.
        tracking_uri: where to send; default the URI the run was logged to
            (credentials from MLflow's environment variables).

    Returns:
        ``[(spool directory, run id, operations sent, error)]``, ``error`` being
        ``None``, or one line on why that spool stopped (its other operations
        wait for the next call; the other spools are still sent). A spool whose
        operations all reached the server is deleted, so a second call sends
        nothing.

    Example:
        >>> for directory, run_id, sent, error in sync():
        ...     print(f"{run_id}: {sent} operations sent", error or "")
    """
    root = Path(path) if path is not None else spool_root()
    if not root.exists():
        if path is None:
            return []  # nothing was ever spooled
        raise SyncError(f"spool directory {str(root)!r} does not exist")
    if tracking_uri is not None:
        check_tracking_uri(tracking_uri)
    spools = [Spool(root)] if (root / "meta.json").exists() else [
        Spool(d) for d in sorted(root.iterdir()) if (d / "meta.json").exists()]
    results = []
    for spool in spools:
        meta = spool.read_meta()
        acked, sent, run_id = spool.acked(), 0, meta.get("run_id")
        try:
            sender = _Sender(spool, tracking_uri or meta["tracking_uri"])
            for op in spool.ops():
                if op["seq"] <= acked:
                    continue
                sender.send(op)
                spool.ack(op["seq"])
                sent += 1
            run_id = sender.run_id()
        except SyncError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported per spool; nothing is lost
            results.append((str(spool.dir), run_id, sent, describe_failure(exc)[0]))
            continue
        spool.remove()
        results.append((str(spool.dir), run_id, sent, None))
    return results
