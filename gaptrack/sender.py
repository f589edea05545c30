"""Sending spooled operations to MLflow: every request bounded in time, and the
one place that retries.

**Requests.** :class:`Sender` makes one request per operation, tried once: an
epoch's metrics are one ``log_batch`` (a request per 1000 points, MLflow's
limit), tags one ``log_batch``, a file one upload, a step image two uploads (the
PNG and the preview MLflow's UI shows; a sender's first image also sets the
run's images tag), the run's description a read and a write, the end of the run
one update. Against an HTTP(S) tracking server each request is given at most
:data:`REQUEST_TIMEOUT` seconds and is not retried by MLflow: the sender has its
own REST store and uploads files itself, with MLflow's HTTP retries off (by
default MLflow tries a request 8 times, minutes apart, each for up to 120 s:
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``). The
environment is left alone, so the user's own MLflow calls keep MLflow's
settings. SQLite and file stores are local; other stores (``databricks``, cloud
artifact stores) keep their own clients' policies.

**Retries.** :class:`BackgroundSender`, the training's sender thread, is the only
place that retries: the same operation again, in order, after 0.5, 1 and 2 s,
then every 5 s, until it is sent or the sender is stopped. A refusal (HTTP 4xx
but 429: bad credentials, a deleted run) is not retried: the thread stops and
the rest waits in the spool for ``gaptrack sync``, which tries each operation
once.

**Exactly once.** An operation is acknowledged in the spool only after the
server answered it, and each is idempotent: a metric point's timestamp is fixed
when it is spooled (MLflow ignores a point identical to one it has), tags
overwrite themselves with the same value, a file or image is uploaded under a
name fixed when it is spooled and replaces itself, and the run is created once
(its id is written to the spool's ``meta.json`` before anything else is sent;
on a disk that refuses, it is kept in memory, see :mod:`gaptrack.outbox`).

**What the user sees.** The first failed request of an outage is a
:class:`TrackingWarning`, issued by the sender thread as soon as the request
fails (at most :data:`REQUEST_TIMEOUT` s after it started), once per outage.
When a request succeeds again, one line is logged (logger ``gaptrack.sender``,
level WARNING so that Python shows it without any logging set up) saying that
the server answers again, after how long.
"""

import functools
import hashlib
import io
import json
import logging
import posixpath
import queue
import tempfile
import threading
import time
import warnings
from pathlib import Path

from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.mime_type_utils import _guess_mime_type
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES, MLFLOW_RUN_NOTE, MLFLOW_USER
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.request_utils import augmented_raise_for_status
from mlflow.utils.rest_utils import http_request, verify_rest_response
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from gaptrack.keys import DESCRIPTION_TAG
from gaptrack.spool import SyncError, safe_relative
from gaptrack.uris import describe_failure, redact_uri

#: Seconds one request to an HTTP(S) tracking server may take.
REQUEST_TIMEOUT = 10.0
#: Seconds between tries of an operation that failed (the last one repeats).
BACKOFF = (0.5, 1.0, 2.0, 5.0)

_logger = logging.getLogger(__name__)


class TrackingWarning(UserWarning):
    """A tracking request failed; the data is kept and retried."""


class _BoundedRestStore(RestStore):
    """MLflow's REST store, each request tried once for at most REQUEST_TIMEOUT s."""

    def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None,
                       response_proto=None):
        infos = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        self._validate_workspace_support_if_specified()
        default_endpoint, method = infos[api]
        endpoint = endpoint or default_endpoint
        body = None if json_body is None else json.loads(json_body)
        response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,
                                timeout=REQUEST_TIMEOUT,
                                **{"params" if method == "GET" else "json": body})
        response = verify_rest_response(response, endpoint)
        proto = response_proto or api.Response()
        if response.status_code != 204:
            parse_dict(js_dict=response.json(), message=proto)
        return proto


def _digest(text):
    """A short fingerprint of a description gaptrack wrote, kept as a tag so that
    a later write can tell its own description from one the user wrote."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Sender:
    """Sends one spool's operations to MLflow, one try each (see the module
    docstring). ``run_id`` and ``run_name`` are known once :meth:`ensure_run`
    returned (``run_id`` before, when the spool names a run to join)."""

    def __init__(self, spool, meta, tracking_uri, disk_error=None):
        self.spool = spool
        self.meta = meta
        self.tracking_uri = tracking_uri
        #: A refusal of the disk (the run id, an ack): raised, or given to this.
        self.disk_error = disk_error
        self.run_id = meta.get("run_id")
        self.run_name = None
        self._store = None
        self._artifacts = None
        self._images_tagged = False  # the run's images tag, set once per sender

    def _client(self):
        if self._store is None:
            if self.tracking_uri.startswith(("http://", "https://")):
                self._store = _BoundedRestStore(
                    functools.partial(get_default_host_creds, self.tracking_uri))
            else:
                from mlflow.tracking._tracking_service.utils import _get_store

                self._store = _get_store(self.tracking_uri)
        return self._store

    def ensure_run(self):
        """Create the run, once (its id is written to the spool before it is
        used), or read the run the spool joins; then its id and name are known."""
        if self._artifacts is not None:
            return
        store = self._client()
        if self.run_id is None:
            meta = self.meta
            experiment_id = meta.get("experiment_id") or self._experiment(meta["experiment_name"])
            tags = meta.get("run_tags") or {}
            start = meta.get("start_time") or int(time.time() * 1000)
            run = store.create_run(experiment_id, user_id=tags.get(MLFLOW_USER, "unknown"),
                                   start_time=start,
                                   tags=[RunTag(k, v) for k, v in tags.items()],
                                   run_name=meta.get("run_name"))
            self.run_id = meta["run_id"] = run.info.run_id  # a retry creates no other run
            self.write(self.spool.write_meta, meta)
        else:
            run = store.get_run(self.run_id)
        self.run_id, self.run_name = run.info.run_id, run.info.run_name
        self._artifacts = get_artifact_repository(run.info.artifact_uri,
                                                  tracking_uri=self.tracking_uri)

    def _experiment(self, name):
        experiment = self._client().get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self._client().create_experiment(name)

    def send(self, op):
        """Send one operation (creating the run first if need be)."""
        self.ensure_run()
        store, kind = self._client(), op["type"]
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            for i in range(0, max(len(metrics), 1), MAX_METRICS_PER_BATCH):
                chunk = metrics[i:i + MAX_METRICS_PER_BATCH]
                store.log_batch(self.run_id, metrics=chunk, params=[], tags=[])
        elif kind == "tags":
            self._set_tags(op["tags"])
        elif kind == "artifact":
            directory = op.get("dir")
            if directory is not None and safe_relative(directory) is None:
                raise SyncError(f"artifact directory {directory!r} is not a relative path")
            self._upload(self._content(op), posixpath.basename(op["path"]), directory)
        elif kind == "image":
            self._send_image(self._content(op), posixpath.basename(op["path"]))
        elif kind == "description":
            tags = store.get_run(self.run_id).data.tags
            # only a note that is empty or that gaptrack wrote is replaced
            note = tags.get(MLFLOW_RUN_NOTE, "")
            if not note or _digest(note) == tags.get(DESCRIPTION_TAG) or note == op["text"]:
                self._set_tags({MLFLOW_RUN_NOTE: op["text"],
                                DESCRIPTION_TAG: _digest(op["text"])})
        elif kind == "end":
            if op["status"] is not None:  # None: a joined run, which its owner ends
                store.update_run_info(self.run_id, RunStatus.from_string(op["status"]),
                                      end_time=op["end_time"], run_name=None)
        else:
            raise SyncError(f"unknown operation {kind!r} in {self.spool.dir}")

    def write(self, method, *args):
        """``method(*args)``, a write to the spool (see :attr:`disk_error`)."""
        try:
            method(*args)
        except OSError as exc:
            if self.disk_error is None:
                raise
            self.disk_error(exc)

    def _content(self, op):
        """The bytes of a file operation kept in memory, else its spooled file."""
        data = op.get("data")
        return data if isinstance(data, bytes) else self.spool.file(op["path"])

    def _set_tags(self, tags):
        self._client().log_batch(self.run_id, metrics=[], params=[],
                                 tags=[RunTag(k, v) for k, v in tags.items()])

    def _send_image(self, png, name):
        """As ``MlflowClient.log_image(..., key=, step=)``: the PNG and a preview
        at most 256 pixels wide under ``images/``, and the run's images tag (once:
        MLflow sets it with every image, a request an epoch for nothing new)."""
        from mlflow.tracking.multimedia import compress_image_size
        from PIL import Image

        preview = io.BytesIO()
        with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as image:
            compress_image_size(image).save(preview, format="webp")
        self._upload(png, name, "images")
        self._upload(preview.getvalue(), name[:-len(".png")] + "+compressed.webp", "images")
        if not self._images_tagged:
            self._set_tags({MLFLOW_LOGGED_IMAGES: "True"})
            self._images_tagged = True

    def _upload(self, source, name, directory):
        """Upload ``source`` (a spooled file, or bytes) as ``directory/name``."""
        if isinstance(self._artifacts, HttpArtifactRepository):
            # MLflow's own upload (HttpArtifactRepository.log_artifact), bounded
            endpoint = posixpath.join("/", *([directory] if directory else []), name)
            data = source.read_bytes() if isinstance(source, Path) else source
            augmented_raise_for_status(http_request(
                self._artifacts._host_creds, endpoint, "PUT", data=data,
                extra_headers={"Content-Type": _guess_mime_type(name)}, max_retries=0,
                timeout=REQUEST_TIMEOUT))
        elif isinstance(source, Path):
            self._artifacts.log_artifact(str(source), directory)
        else:
            with tempfile.TemporaryDirectory(prefix="gaptrack-") as tmp:
                Path(tmp, name).write_bytes(source)
                self._artifacts.log_artifact(str(Path(tmp, name)), directory)


def warn_tracking(message):
    """A :class:`TrackingWarning`, from any thread; when warnings are turned
    into errors, a log line instead (the thread carries on)."""
    try:
        warnings.warn(message, TrackingWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - a warnings filter set to "error"
        _logger.warning(message)


class BackgroundSender:
    """The training's sender thread: sends the operations queued with
    :meth:`submit`, in order, retrying each until it is sent (see the module
    docstring); the run is created (or read) first.

    It holds the spool's lock, locked by its creator, until it stops: after
    :meth:`stop`, the request in flight is finished (at most
    :data:`REQUEST_TIMEOUT` s), the lock released, and ``gaptrack sync`` may send
    the rest. ``sent`` is the last ``seq`` the server acknowledged, ``fatal`` why
    the server refused (then the thread stopped), ``run_ready`` whether the run
    exists on the server.
    """

    def __init__(self, spool, meta, tracking_uri, disk_error):
        self.sender = Sender(spool, meta, tracking_uri, disk_error)
        self.sent = -1
        self.fatal = None
        self.run_ready = False
        self.stopped = False
        self._outage_start = None
        self._queue = queue.Queue()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gaptrack-sender", daemon=True)
        self._thread.start()

    def submit(self, op):
        self._queue.put(op)

    def wait(self, done, timeout):
        """Wait until ``done()`` holds, at most ``timeout`` seconds (``None``: no
        limit) and no longer than the thread runs; ``done()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not done() and not self.stopped:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(remaining)
            return done()

    def stop(self):
        """Stop after the request in flight; the spool's lock is then released."""
        self._stop.set()
        self._queue.put(None)

    def _work(self):
        try:
            if not self._deliver(self.sender.ensure_run):
                return
            self._update(run_ready=True)
            while True:
                op = self._queue.get()
                if (op is None or self._stop.is_set()
                        or not self._deliver(functools.partial(self.sender.send, op))):
                    return
                self.sender.write(self.sender.spool.ack, op["seq"])
                self._update(sent=op["seq"])
        finally:
            self.sender.spool.unlock()
            self._update(stopped=True)

    def _update(self, **state):
        with self._changed:
            for name, value in state.items():
                setattr(self, name, value)
            self._changed.notify_all()

    def _deliver(self, request):
        """Make ``request`` until it succeeds (``True``), or the server refuses
        it or the sender is stopped (``False``)."""
        attempt = 0
        while True:
            try:
                request()
            except Exception as exc:  # noqa: BLE001 - never raised into training
                text, permanent = describe_failure(exc)
                if self._outage_start is None:
                    self._outage_start = time.monotonic()
                    then = ("the rest waits in the spool for `gaptrack sync`" if permanent
                            else "kept and retried in the background")
                    warn_tracking(f"gaptrack could not log to MLflow at "
                          f"{redact_uri(self.sender.tracking_uri)} ({text}); "
                          f"{self._queue.qsize() + 1} item(s) {then}")
                if permanent:
                    self._update(fatal=text)
                    return False
                if self._stop.wait(BACKOFF[min(attempt, len(BACKOFF) - 1)]):
                    return False
                attempt += 1
                continue
            if self._outage_start is not None:
                _logger.warning("gaptrack: the tracking server %s answers again after %.0f s; "
                                "the kept items are being sent",
                                redact_uri(self.sender.tracking_uri),
                                time.monotonic() - self._outage_start)
                self._outage_start = None
            return True
