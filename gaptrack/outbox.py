"""Where a training keeps its run's operations until the server has them: the
spool on disk (:mod:`gaptrack.spool`) or, when the disk refuses, memory.

**A full or read-only disk is not fatal.** The first write the disk refuses
(creating the spool, an operation, a file, the run's id, an acknowledgement)
is one :class:`gaptrack.sender.TrackingWarning` naming the spool's path and
the error; from then on the run writes nothing more to the spool while it
trains. Each later operation is kept in memory and the sender thread sends it
from there, while the server answers, as it would have sent it from the spool.

**The bound.** Operations kept in memory only, and not yet acknowledged by the
server, take at most :data:`MEMORY_BOUND` bytes (64 MiB: an operation's JSON and
its file's bytes); one that would go beyond it is not kept. A tracked epoch of a
small model takes a few tens of kB (its metrics, BN snapshot table and two
images), so the bound holds about a thousand epochs of an outage of both the
disk and the server.

**At train end** (:meth:`Outbox.finish`), what is still in memory and unsent is
written to the spool once more (the disk may have room again), for
``gaptrack sync``; then one warning says which operations could not be kept
(their steps, files and tags), or that none was lost.
"""

import collections
import json
import threading

from gaptrack.sender import warn_tracking

#: Bytes of operations held in memory only (not on disk, not yet sent), at most.
MEMORY_BOUND = 64 * 2**20


class Outbox:
    """Keeps one run's operations: in ``spool``, else in memory (see the module
    docstring). ``refused`` is the first refusal of the disk (``None``: none)."""

    def __init__(self, spool, meta):
        self.spool = spool
        self.refused = None
        #: Operations not kept anywhere (over the bound, or at the end).
        self.lost = []
        self._memory = collections.deque()  # [(seq, bytes, op)] kept in memory only, in order
        self._held = 0  # their bytes
        self._lock = threading.Lock()
        try:
            spool.create(meta)
        except OSError as exc:
            self.refuse(exc)

    def refuse(self, exc):
        """The disk refused a write: warn once, keep the rest in memory."""
        with self._lock:
            first, self.refused = self.refused is None, self.refused or exc
        if first:
            warn_tracking(f"gaptrack cannot write to its spool {self.spool.dir} "
                          f"({type(exc).__name__}: {exc}); the run's operations are kept "
                          f"in memory (at most {MEMORY_BOUND // 2**20} MiB not yet sent) "
                          "and sent while the server answers; train end says what could "
                          "not be kept")

    def keep(self, op, data, sent):
        """Keep ``op`` (``data``: its file's bytes, or ``None``), ``sent`` being
        the last ``seq`` the server acknowledged; the operation to send, or
        ``None`` when it could not be kept."""
        if self.refused is None:
            try:
                if data is not None:
                    self.spool.write_file(op["path"], data)
                self.spool.append(op)
                return op
            except OSError as exc:
                self.refuse(exc)
        while self._memory and self._memory[0][0] <= sent:
            self._held -= self._memory.popleft()[1]
        size = len(json.dumps(op)) + len(data or b"")
        if self._held + size > MEMORY_BOUND:
            self.lost.append(op)
            return None
        held = op if data is None else {**op, "data": data}
        self._memory.append((op["seq"], size, held))
        self._held += size
        return held

    def finish(self, sent, run_id):
        """At train end, with ``sent`` the last ``seq`` acknowledged: write what
        memory holds unsent to the spool, then say what could not be kept; how
        many of the unsent operations could not be written."""
        if self.refused is None:
            return 0
        unsent = [op for seq, _, op in self._memory if seq > sent]
        self._memory.clear()
        self._held = 0
        try:  # the run's id too, if the disk refused it
            (self.spool.dir / "files").mkdir(parents=True, exist_ok=True)
            self.spool.write_meta(self.spool.meta)
        except OSError:
            pass
        missing = 0
        for op in unsent:  # each on its own: a record may fit where a file does not
            try:
                if "data" in op:
                    self.spool.write_file(op["path"], op["data"])
                self.spool.append({k: v for k, v in op.items() if k != "data"})
            except OSError:
                self.lost.append(op)
                missing += 1
        self.lost.sort(key=lambda op: op["seq"])
        where = f"run {run_id}" if run_id else "the run (not created)"
        if not self.lost:
            warn_tracking(f"gaptrack: nothing of {where} was lost although its spool "
                          f"{self.spool.dir} refused writes ({self.refused}): what it "
                          "could not hold was sent from memory or written at the end")
        else:
            warn_tracking(f"gaptrack could not keep {len(self.lost)} operation(s) of {where} "
                          f"(its spool {self.spool.dir} refused writes: {self.refused}; "
                          f"they did not reach the server): {describe(self.lost)}")
        return missing


def describe(ops):
    """What operations hold, in a few words: steps, files, tags."""
    steps = sorted({m[3] for op in ops if op["type"] == "metrics" for m in op["metrics"]})
    parts = []
    if steps:
        parts.append(f"metrics at step(s) {', '.join(map(str, steps))}")
    files = [f"{op['dir']}/" * bool(op.get("dir")) + op["path"].split("/", 2)[2]
             for op in ops if op["type"] == "artifact"]
    files += [f"image {op['key']} at step {op['step']}" for op in ops if op["type"] == "image"]
    if files:
        parts.append(f"{len(files)} file(s): {', '.join(files)}")
    tags = sorted({k for op in ops if op["type"] == "tags" for k in op["tags"]})
    if tags:
        parts.append(f"tags {', '.join(tags)}")
    if any(op["type"] == "description" for op in ops):
        parts.append("the run's description")
    if any(op["type"] == "end" for op in ops):
        parts.append("the run's end")
    return "; ".join(parts)
