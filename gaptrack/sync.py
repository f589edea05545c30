"""``gaptrack sync``: send what training could not (the server was away).

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
"""

import time
from pathlib import Path

from gaptrack.sender import REQUEST_TIMEOUT, Sender
from gaptrack.spool import Spool, SyncError, spool_root
from gaptrack.uris import check_tracking_uri, describe_failure

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
    sender, sent = Sender(spool, uri), 0
    acked = spool.acked()
    try:
        for op in spool.ops():
            if op["seq"] <= acked:
                continue
            sender.send(op)
            spool.ack(op["seq"])
            sent += 1
        sender.ensure_run()
    except SyncError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported per spool; nothing is lost
        return (sender.run_id, sent, *describe_failure(exc))
    spool.remove()
    return sender.run_id, sent, None, False
