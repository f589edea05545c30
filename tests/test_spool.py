"""The spool against torn writes and refusing disks: sync sends exactly the
whole records of a spool cut at any byte; a full or read-only disk during a
real training costs fit() nothing, and train end says exactly what was lost."""

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import keras
import mlflow
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from conftest import free_port, timed_warnings
from gaptrack import outbox
from gaptrack.spool import MAGIC, RECORDS, Spool, decode, encode
from gaptrack.sync import sync
from gaptrack.tracking import RunLogger, TrackingWarning


@pytest.fixture
def fast_store(_empty_sqlite_store):
    """A fresh SQLite store in memory-backed ``/dev/shm`` when there is one
    (hundreds of runs: each commit is then not a disk sync)."""
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="gaptrack-store-",
                                   dir=shm if shm.is_dir() else None))
    shutil.copy(_empty_sqlite_store, folder / "mlflow.db")
    yield f"sqlite:///{folder / 'mlflow.db'}"
    shutil.rmtree(folder, ignore_errors=True)


def _meta(run_name, **extra):
    return {"tracking_uri": "unused", "run_id": None, "experiment_id": "0",
            "run_name": run_name, "host": socket.gethostname(), "pid": os.getpid(),
            "process_run": True, **extra}


#: A spool's operations: what the store shows of each when it arrived.
OPS = [{"seq": 0, "type": "metrics", "metrics": [["loss", 0.5, 1000, 0]]},
       {"seq": 1, "type": "tags", "tags": {"t1": "a"}},
       {"seq": 2, "type": "metrics", "metrics": [["loss", 0.25, 2000, 1]]},
       {"seq": 3, "type": "tags", "tags": {"t3": "b"}},
       {"seq": 4, "type": "end", "status": "FINISHED", "end_time": 3000}]
#: The operations whose records are cut at every byte offset.
LAST = 3


def _arrived(client, run):
    """What of :data:`OPS` the store holds for ``run``, as the seqs that arrived."""
    steps = [p.step for p in client.get_metric_history(run.info.run_id, "loss")]
    seqs = [op["seq"] for op in OPS if op["type"] == "metrics"
            and op["metrics"][0][3] in steps]
    seqs += [op["seq"] for op in OPS if op["type"] == "tags"
             and set(op["tags"]) <= set(run.data.tags)]
    seqs += [4] if run.info.status == "FINISHED" else []
    return sorted(seqs)


def test_sync_sends_exactly_the_whole_records_of_a_spool_cut_at_every_byte(
        tmp_path, fast_store, caplog):
    """A spool of five records, cut at every byte offset of its last three (one
    spool per offset, all synced in one call): the store holds exactly the
    records written whole before the cut, and one line per cut spool names the
    bytes and the operation dropped."""
    whole = MAGIC + b"".join(encode(op) for op in OPS)
    ends = []  # the offset at which each record ends
    for op in OPS:
        ends.append((ends[-1] if ends else len(MAGIC)) + len(encode(op)))
    first = ends[len(OPS) - LAST - 1]
    offsets = range(first, len(whole) + 1)
    root = tmp_path / "spools"
    for offset in offsets:
        spool = Spool(root / f"{offset:05d}")
        spool.create(_meta(f"cut-{offset}"))
        spool.unlock()
        (spool.dir / RECORDS).write_bytes(whole[:offset])
        ops, torn = spool.records()
        assert [op["seq"] for op in ops] == [op["seq"] for op, end in zip(OPS, ends)
                                             if end <= offset]
    with caplog.at_level(logging.WARNING, logger="gaptrack.sync"):
        results = sync(root, tracking_uri=fast_store)
    assert [error for *_, error in results] == [None] * len(offsets)
    assert not any(root.iterdir())  # every spool sent and removed
    client = MlflowClient(fast_store)
    runs = {r.info.run_name: r for r in client.search_runs(["0"], max_results=1000)}
    lines = {re.search(r"/(\d+): ", r.getMessage()).group(1): r.getMessage()
             for r in caplog.records if r.name == "gaptrack.sync"}
    for offset in offsets:
        whole_ops = [op["seq"] for op, end in zip(OPS, ends) if end <= offset]
        assert _arrived(client, runs[f"cut-{offset}"]) == whole_ops, offset
        cut = max(end for end in [first, *ends] if end <= offset)
        line = lines.pop(f"{offset:05d}", None)
        if cut == offset:
            assert line is None
        else:
            torn = whole_ops[-1] + 1
            assert f"torn tail of {offset - cut} byte(s) at offset {cut}: operation {torn}" \
                in line, line
    assert not lines
    # the records alone, read at every offset of the whole file
    for offset in range(len(whole) + 1):
        ops, torn = decode(whole[:offset])
        assert ops == [op for op, end in zip(OPS, ends) if end <= offset]
        assert (torn is None) == (offset in (0, len(MAGIC), *ends)), offset
