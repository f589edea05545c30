"""The spool against torn writes and refusing disks: sync sends exactly the
whole records of a spool cut at any byte; a full or read-only disk during a
real training costs fit() nothing, and train end says exactly what was lost."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
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


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs (the tests run as root), unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _disk_warnings(seen, spool_dir):
    """The warnings about the spool's disk: ``(refused, end)``."""
    refused = [text for _, category, text in seen if category is TrackingWarning
               and text.startswith(f"gaptrack cannot write to its spool {spool_dir}")]
    end = [text for _, category, text in seen if category is TrackingWarning
           and ("could not keep" in text or "nothing of" in text)]
    return refused, end


def test_a_disk_that_fills_during_training_costs_fit_nothing_and_train_end_says_what_is_lost(
        small_disk, tmp_path, fast_store, monkeypatch):
    """The spool on a 256 kB tmpfs, 200 kB of it taken, that fills during a
    4-epoch training, the server unreachable: fit() returns (every tracker
    failure would raise under the test suite), one warning names the spool and
    the error, one at train end lists what could not be kept; the spool, copied
    to a disk with room and synced, holds exactly the rest: every epoch's
    metrics and BN table are on the run or in that list."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAPTRACK_SPOOL_DIR", str(small_disk))
    (small_disk / "other").write_bytes(b"x" * 200 * 1024)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        keras.utils.set_random_seed(0)
        x, y = blobs(48)
        tracker = gaptrack.GapTracker((x, y), batch_size=16, close_timeout=1.0)
        epoch_ends = []
        clock = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch_ends.append(time.monotonic()))
        with timed_warnings() as seen:
            history = mlp(bn=True).fit(x, y, batch_size=16, epochs=4, verbose=0,
                                       callbacks=[tracker, clock])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(history.history["loss"]) == 4
    spool = tracker.logger.spool.dir
    [refused], [end] = _disk_warnings(seen, spool)
    refused_at = [t for t, _, text in seen if text == refused]
    assert "No space left on device" in refused and "kept in memory (at most 64 MiB" in refused
    steps = re.search(r"metrics at step\(s\) ([\d, ]+)", end)
    lost = {int(s) for s in steps.group(1).split(", ")} if steps else set()
    assert re.search(r"\d+ file\(s\): ", end)  # the report's files, at least
    lost_tables = {int(e) for e in re.findall(r"bn_snapshots/epoch_(\d+)\.parquet", end)}
    assert not list(spool.rglob("*.tmp"))  # no half-written file
    copy = tmp_path / "copy"
    shutil.copytree(spool, copy)
    store = fast_store
    [(_, run_id, sent, error)] = sync(copy, tracking_uri=store)
    assert error is None and sent > 0
    client = MlflowClient(store)
    points = client.get_metric_history(run_id, "fit/loss")
    kept = [p.step for p in points]
    assert sorted(set(kept) | lost) == list(range(4)) and not set(kept) & lost, (kept, lost)
    assert refused_at[0] < epoch_ends[-1]  # the disk filled during the training
    assert [p.value for p in points] == [history.history["loss"][s] for s in kept]
    assert [p.step for p in client.get_metric_history(run_id, "gap/loss")] == kept
    tables = gaptrack.load_bn_snapshots(run_id, tracking_uri=store)
    epochs = set(tables.epoch.unique())
    assert sorted(epochs | lost_tables) == list(range(4)) and not epochs & lost_tables
    status = client.get_run(run_id).info.status
    assert status == ("RUNNING" if "the run's end" in end else "FINISHED")


def test_a_read_only_disk_costs_nothing_while_the_server_answers(small_disk, server_uri,
                                                                  monkeypatch):
    """The spool's disk is read-only from the start: one warning, every
    operation sent from memory, nothing lost (said at train end), nothing written."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    monkeypatch.setenv("GAPTRACK_SPOOL_DIR", str(small_disk / "spool"))
    keras.utils.set_random_seed(0)
    x, y = blobs(48)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    with timed_warnings() as seen:
        history = mlp(bn=True).fit(x, y, batch_size=16, epochs=3, verbose=0,
                                   callbacks=[tracker])
    [refused], [end] = _disk_warnings(seen, tracker.logger.spool.dir)
    assert "Read-only file system" in refused
    assert end.startswith(f"gaptrack: nothing of run {tracker.run_id} was lost"), end
    assert [text for _, category, text in seen if category is TrackingWarning] == [refused, end]
    assert not any(small_disk.iterdir())
    client = MlflowClient(server_uri)
    points = client.get_metric_history(tracker.run_id, "fit/loss")
    assert [(p.step, p.value) for p in points] == list(enumerate(history.history["loss"]))
    tables = gaptrack.load_bn_snapshots(tracker.run_id, tracking_uri=server_uri)
    assert sorted(tables.epoch.unique()) == [0, 1, 2]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["gaptrack.probe_size"] == "48"
    images = [f.path for f in client.list_artifacts(tracker.run_id, "images")]
    assert len(images) == 3 * 2 * 2  # per epoch two images, each with its preview


def test_memory_holds_operations_up_to_its_bound_and_train_end_lists_the_rest(
        tmp_path, monkeypatch):
    """The spool's directory cannot be made (its parent is a file) and the
    server is unreachable: operations are kept in memory while they fit in the
    bound (their JSON sizes, counted here), the others are not kept; train end
    lists every step, none twice, and the spool is never written."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("GAPTRACK_SPOOL_DIR", str(blocker / "spool"))
    monkeypatch.setattr(outbox, "MEMORY_BOUND", 2000)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    metrics = {f"gap/m{i}": 0.5 for i in range(6)}
    steps = range(10, 30)
    sizes = [len(json.dumps({"seq": seq, "type": "metrics", "metrics": [
        [k, v, 1_700_000_000_000, step] for k, v in metrics.items()]}))
        for seq, step in enumerate(steps)]
    fits = max(n for n in range(len(sizes) + 1) if sum(sizes[:n]) <= 2000)
    assert 0 < fits < len(steps)
    try:
        with timed_warnings() as seen:
            logger = RunLogger(close_timeout=0.5)
            for step in steps:
                logger.log_metrics(metrics, step)
            assert logger.pending == fits
            assert not logger.close()
    finally:
        mlflow.set_tracking_uri(None)
    [refused], [end] = _disk_warnings(seen, logger.spool.dir)
    assert "NotADirectoryError" in refused
    assert end.startswith(f"gaptrack could not keep {len(steps) + 1} operation(s) of the run "
                          "(not created)"), end
    assert end.endswith(f"metrics at step(s) {', '.join(map(str, steps))}; the run's end")
    assert [text for _, c, text in seen if c is TrackingWarning and "gaptrack sync" in text] == []
    assert blocker.read_text() == ""


def test_a_spool_of_the_line_format_before_records_is_still_read(tmp_path, fast_store, caplog):
    """An ``ops.jsonl`` spool whose disk filled mid-line, then took more lines
    (what the issue's user was left with): every line that parses is sent, the
    torn one, with the operation appended to it on the same line, is dropped
    with one line counting its bytes."""
    spool = Spool(tmp_path / "old")
    spool.create(_meta("old"))
    spool.unlock()
    lines = [json.dumps(op) + "\n" for op in OPS]
    torn = lines[2][:40]
    (spool.dir / "ops.jsonl").write_text(lines[0] + lines[1] + torn + "".join(lines[3:]))
    with caplog.at_level(logging.WARNING, logger="gaptrack.sync"):
        [(_, run_id, sent, error)] = sync(spool.dir, tracking_uri=fast_store)
    assert error is None and sent == len(OPS) - 2
    client = MlflowClient(fast_store)
    assert _arrived(client, client.get_run(run_id)) == [0, 1, 4]
    [line] = [r.getMessage() for r in caplog.records if r.name == "gaptrack.sync"]
    assert f"dropped a torn tail of {len(torn) + len(lines[3])} byte(s)" in line, line
