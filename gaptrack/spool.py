"""The spool: one run's operations on local disk until the server has them.

**Where.** ``$GAPTRACK_SPOOL_DIR`` if set, else ``$XDG_STATE_HOME/gaptrack/spool``
(``~/.local/state/gaptrack/spool``), one sub-directory per run, deleted once
everything is on the server. A run's directory holds ``meta.json`` (where to send:
the tracking URI without credentials, the run or how to create it), ``ops.jsonl``
(one operation a line, numbered by ``seq``), ``acked`` (the last ``seq`` the server
acknowledged), the files of artifact operations under ``files/``, and ``lock``.

**One sender at a time.** Whoever sends a spool holds an exclusive ``flock`` on its
``lock`` file: the training's background sender from the spool's creation until it
stops, ``gaptrack sync`` while it sends. The lock is the operating system's, so it
is released when its holder exits, even by a crash.
"""

import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path

#: Environment variable naming the spool directory.
SPOOL_ENV = "GAPTRACK_SPOOL_DIR"


class SyncError(RuntimeError):
    """A spool directory cannot be synchronised; the message says why."""


def spool_root():
    """The directory under which runs are spooled (see the module docstring)."""
    configured = os.environ.get(SPOOL_ENV)
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return Path(state) / "gaptrack" / "spool"


def safe_relative(path):
    """``path`` if it is relative and stays below its base, else ``None``."""
    if not path:
        return None
    pure = Path(path)
    if pure.is_absolute() or ".." in pure.parts or path.startswith(("/", "\\")):
        return None
    return path


class Spool:
    """One run's operations on disk (see the module docstring)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._lock_fd = None

    @classmethod
    def create(cls, meta):
        """A new spool under :func:`spool_root`, locked by the caller before any
        ``gaptrack sync`` can see it."""
        spool = cls(spool_root() / uuid.uuid4().hex)
        (spool.dir / "files").mkdir(parents=True)
        spool.lock(wait=0.0)
        spool.write_meta(meta)
        return spool

    def exists(self):
        return (self.dir / "meta.json").exists()

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
        safe = safe_relative(relative)
        if safe is None or not safe.startswith("files/"):
            raise SyncError(f"spool {self.dir} names a file outside it: {relative!r}")
        return self.dir / safe

    def lock(self, wait):
        """Take the spool's exclusive lock, waiting at most ``wait`` seconds for
        its holder to release it; ``True`` once held, ``False`` when another
        sender still holds it (or the spool was removed meanwhile)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            return False
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.1)
                continue
            self._lock_fd = fd
            return True

    def unlock(self):
        """Release the lock (nothing when it is not held)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)
