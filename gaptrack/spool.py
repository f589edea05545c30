"""The spool: one run's operations on local disk until the server has them.

**Where.** ``$GAPTRACK_SPOOL_DIR`` if set, else ``$XDG_STATE_HOME/gaptrack/spool``
(``~/.local/state/gaptrack/spool``), one sub-directory per run, deleted once
everything is on the server. A run's directory holds ``meta.json`` (where to send:
the tracking URI without credentials, the run or how to create it, and the host
and process id of the training), ``ops.log`` (the operations, numbered by
``seq``), ``acked`` (the last ``seq`` the server acknowledged), the files of
artifact operations under ``files/``, and ``lock``.

**Records that survive a torn write** (LevelDB's log format and W&B's offline
``.wandb`` files do the same). ``ops.log`` starts with the 8 bytes
:data:`MAGIC`; then each operation is one record: its length (4 bytes,
little-endian), the CRC-32 of its payload (4 bytes, little-endian) and the
payload, the operation as UTF-8 JSON (``{"seq": ..., "type": ..., ...}``). A
reader takes the records in order
and stops at the first one that is cut short or whose checksum does not match:
that *torn tail* (a process killed mid-write, a disk that filled) is dropped,
with one line saying how many bytes and which operation (:class:`Torn`), and
every record before it is whole. A writer whose ``write`` failed cuts the file
back to its last whole record. ``meta.json``, ``acked`` and every file are
written to a temporary name and renamed, so that they are whole or absent: a
half-written file is never sent and never blocks a retry.

Spools of gaptrack 0.x before this format (``ops.jsonl``, one JSON operation a
line) are still read: every line that parses is an operation, the others are
dropped as torn.

**One sender at a time.** Whoever sends a spool holds an exclusive ``flock`` on its
``lock`` file: the training's background sender from the spool's creation until it
stops, ``gaptrack sync`` while it sends. The lock is the operating system's, so it
is released when its holder exits, even by a crash.
"""

import fcntl
import json
import os
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming the spool directory.
SPOOL_ENV = "GAPTRACK_SPOOL_DIR"
#: The first bytes of ``ops.log`` (the format's version is its last byte).
MAGIC = b"GTSPOOL1"
#: A record's header: payload length and CRC-32, little-endian.
HEADER = struct.Struct("<II")
RECORDS, LEGACY_RECORDS = "ops.log", "ops.jsonl"
#: How the payload of a torn record starts, when enough of it was written.
_TORN_OP = re.compile(rb'^\{"seq": (\d+), (?:"type": "(\w+)")?')


class SyncError(RuntimeError):
    """A spool directory cannot be synchronised; the message says why."""


@dataclass
class Torn:
    """A torn tail dropped from a spool: ``size`` bytes from ``offset``; the
    operation it held (``seq``, ``kind``, each ``None`` where the bytes that
    would say it were not written)."""

    offset: int
    size: int
    seq: int = None
    kind: str = None

    def describe(self, last_seq):
        """One line: what was dropped (``last_seq``: the last whole operation's)."""
        seq = self.seq if self.seq is not None else (
            0 if last_seq is None else last_seq + 1)
        kind = f" ({self.kind})" if self.kind else ""
        return (f"dropped a torn tail of {self.size} byte(s) at offset {self.offset}: "
                f"operation {seq}{kind}, written in part (a process killed mid-write or "
                f"a full disk); every operation before it is whole")


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


def encode(op):
    """One operation as a record (header and payload)."""
    payload = json.dumps(op).encode("utf-8")
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode(data):
    """``(operations, torn)`` of the bytes of an ``ops.log``: every whole record,
    and the :class:`Torn` tail after them (``None`` when there is none)."""
    offset = len(MAGIC) if data.startswith(MAGIC) else 0
    if offset == 0 and data:
        return [], Torn(0, len(data))
    ops = []
    while offset < len(data):
        start = offset + HEADER.size
        size, crc = HEADER.unpack_from(data, offset) if start <= len(data) else (None, None)
        payload = data[start:start + size] if size is not None else b""
        if size is None or len(payload) < size or zlib.crc32(payload) != crc:
            match = _TORN_OP.match(payload)
            seq, kind = match.groups() if match else (None, None)
            return ops, Torn(offset, len(data) - offset, seq and int(seq),
                             kind and kind.decode())
        ops.append(json.loads(payload))
        offset = start + size
    return ops, None


def _write_whole(path, data):
    """Write ``data`` to ``path`` through a temporary name: whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class Spool:
    """One run's operations on disk (see the module docstring). Every method
    that writes raises ``OSError`` when the disk refuses; what to do then is
    :mod:`gaptrack.outbox`'s (training) or :mod:`gaptrack.sync`'s."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._lock_fd = None
        self._size = None  # bytes of whole records in ops.log, once written to
        #: What ``meta.json`` holds (once created, or read).
        self.meta = None

    def create(self, meta):
        """Make the directory, take its lock (before any ``gaptrack sync`` can
        see it: ``meta.json`` comes last) and write ``meta``, kept as
        :attr:`meta` even when the disk refuses."""
        self.meta = meta
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        if not self.lock(wait=0.0):
            raise SyncError(f"spool {self.dir} is locked by another sender")
        self.write_meta(meta)

    def exists(self):
        return (self.dir / "meta.json").exists()

    def read_meta(self):
        self.meta = json.loads((self.dir / "meta.json").read_text())
        return self.meta

    def write_meta(self, meta):
        _write_whole(self.dir / "meta.json", json.dumps(meta).encode("utf-8"))

    def append(self, op):
        """Append one operation; on failure the file is cut back to its last
        whole record (when the disk allows it) and the error raised."""
        fd = os.open(self.dir / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if self._size is None:
                self._size = os.lseek(fd, 0, os.SEEK_END)
            record = encode(op) if self._size else MAGIC + encode(op)
            rest = memoryview(record)
            try:
                while rest:  # a full disk first writes part, then refuses
                    rest = rest[os.write(fd, rest):]
            except OSError:
                try:
                    os.ftruncate(fd, self._size)
                except OSError:
                    pass  # a reader drops the torn tail
                raise
            self._size += len(record)
        finally:
            os.close(fd)

    def write_file(self, relative, data):
        """Write the file of an artifact operation, whole or not at all."""
        target = self.file(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(target, data)

    def records(self):
        """``(operations, torn)``: every whole record, in order, and the
        :class:`Torn` tail dropped after them (``None``: none)."""
        path = self.dir / RECORDS
        if path.exists():
            return decode(path.read_bytes())
        legacy = self.dir / LEGACY_RECORDS
        if not legacy.exists():
            return [], None
        ops, dropped, offset = [], 0, 0
        for line in legacy.read_bytes().splitlines(keepends=True):
            try:
                ops.append(json.loads(line))
            except ValueError:
                dropped += len(line) if line.strip() else 0
            offset += len(line)
        return ops, (Torn(offset - dropped, dropped) if dropped else None)

    def cut(self, torn):
        """Drop a torn tail from ``ops.log`` once it has been reported."""
        if (self.dir / RECORDS).exists():
            os.truncate(self.dir / RECORDS, torn.offset)

    def acked(self):
        path = self.dir / "acked"
        return int(path.read_text()) if path.exists() else -1

    def ack(self, seq):
        _write_whole(self.dir / "acked", str(seq).encode())

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
