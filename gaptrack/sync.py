"""``gaptrack sync``: send what training could not (the server was away), and
end the runs of trainings that were killed.

Each operation is tried once (no retries: run it again later), each request
bounded by :data:`gaptrack.sender.REQUEST_TIMEOUT`; after the first failure that
is not a refusal, the other spools bound for the same server are not tried in
this call. So against a server that is down, :func:`sync` ends within about
``LOCK_WAIT + REQUEST_TIMEOUT`` seconds (25 s) per server, whatever the number
of spools.

A spool a training is still sending (its lock is held, see
:mod:`gaptrack.spool`) is not sent twice: :func:`sync` waits up to
:data:`LOCK_WAIT` seconds in all (time for a sender stopped at its close timeout
to finish its last request), then reports the spool as being sent.

**Torn tails.** Every whole record of a spool is sent; a torn tail (a process
killed mid-write, a disk that filled) is dropped from the spool, with one line
(logger ``gaptrack.sync``, level WARNING) saying how many bytes and which
operation.

**Killed trainings.** A spool without an end-of-run record, written on this
host by a process that no longer exists (killed: preemption, the OOM killer,
SIGKILL), is sent, then its run is ended as ``KILLED`` (its end time: the
spool's last write) with the tag :data:`gaptrack.keys.LAST_EPOCH_TAG` giving the
last epoch logged, and one line says so. A run the training joined rather than
started (``GapTracker(run_id=...)``) gets the tag and keeps its status. A spool
written on another host is sent and left as it is: whether its process lives
cannot be told from here.
"""

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from gaptrack.keys import LAST_EPOCH_TAG
from gaptrack.sender import REQUEST_TIMEOUT, Sender
from gaptrack.spool import RECORDS, Spool, SyncError, spool_root
from gaptrack.uris import check_tracking_uri, describe_failure

_logger = logging.getLogger(__name__)

__all__ = ["LOCK_WAIT", "SyncError", "sync"]

#: Seconds :func:`sync` waits, in all, for spools locked by a running sender.
LOCK_WAIT = REQUEST_TIMEOUT + 5.0


def sync(path=None, tracking_uri=None):
    """Send spooled operations that did not reach the server.

    Args:
        path: one run's spool directory, or a directory of them; default
            :func:`gaptrack.spool.spool_root`.
        tracking_uri: where to send; default the URI the run was logged to
            (credentials from MLflow's environment variables).

    Returns:
        ``[(spool directory, run id, operations sent, error)]``, ``error`` being
        ``None``, or one line on why that spool stopped (its other operations
        wait for the next call; nothing is lost). A spool whose operations all
        reached the server is deleted, so a second call sends nothing.

    Raises:
        SyncError: ``path`` does not exist, or a spool names a file outside it.

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
    spools = [Spool(root)] if Spool(root).exists() else [
        Spool(d) for d in sorted(root.iterdir()) if Spool(d).exists()]
    lock_deadline = time.monotonic() + LOCK_WAIT
    down = {}  # tracking URI -> why it failed in this call
    results = []
    for spool in spools:
        meta = spool.read_meta()
        uri = tracking_uri or meta["tracking_uri"]
        directory, run_id = str(spool.dir), meta.get("run_id")
        if uri in down:
            results.append((directory, run_id, 0, down[uri]))
            continue
        if not spool.lock(wait=max(lock_deadline - time.monotonic(), 0.0)):
            if spool.exists():
                results.append((directory, run_id, 0, "a running training is sending it "
                                "(it holds the spool's lock)"))
            continue
        try:
            if not spool.exists():
                continue  # its training sent it meanwhile
            run_id, sent, error, permanent = _send(spool, uri)
        finally:
            spool.unlock()
        if error is not None and not permanent:
            down[uri] = error
        results.append((directory, run_id, sent, error))
    return results


def _send(spool, uri):
    """Send one locked spool: ``(run id, sent, error, permanent)``."""
    meta = spool.read_meta()
    sender, sent = Sender(spool, meta, uri), 0
    acked = spool.acked()
    ops, torn = spool.records()
    if torn is not None:
        last = ops[-1]["seq"] if ops else None
        _logger.warning("gaptrack sync: %s: %s", spool.dir, torn.describe(last))
        with contextlib.suppress(OSError):  # a spool on a read-only copy
            spool.cut(torn)
    try:
        for op in ops:
            if op["seq"] <= acked:
                continue
            sender.send(op)
            spool.ack(op["seq"])
            sent += 1
        sender.ensure_run()
        if not any(op["type"] == "end" for op in ops) and _process_gone(meta):
            _end_killed(spool, sender, meta, ops)
    except SyncError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported per spool; nothing is lost
        return (sender.run_id, sent, *describe_failure(exc))
    spool.remove()
    return sender.run_id, sent, None, False


def _process_gone(meta):
    """Whether the training that wrote the spool ran on this host and its
    process no longer exists (a zombie is gone too)."""
    if meta.get("host") != socket.gethostname() or not isinstance(meta.get("pid"), int):
        return False
    try:
        os.kill(meta["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's process
    try:
        with open(f"/proc/{meta['pid']}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _end_killed(spool, sender, meta, ops):
    """Tag the last epoch the killed training logged; end its run as KILLED."""
    steps = [m[3] for op in ops if op["type"] == "metrics" for m in op["metrics"]]
    last = str(max(steps)) if steps else "none"
    sender.send({"type": "tags", "tags": {LAST_EPOCH_TAG: last}})
    ended = meta.get("process_run")
    if ended:
        written = spool.dir / RECORDS
        end_time = int((written if written.exists() else spool.dir).stat().st_mtime * 1000)
        sender.send({"type": "end", "status": "KILLED", "end_time": end_time})
    _logger.warning("gaptrack sync: %s: the training that logged run %s (process %s on %s) "
                    "is gone without ending it: %s, last epoch logged: %s", spool.dir,
                    sender.run_id, meta["pid"], meta["host"],
                    "ended KILLED" if ended else "it joined the run, whose status is kept",
                    last)
