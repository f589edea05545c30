"""RunLogger and sync: spooled, background, retried, exactly once on the server."""

import io
import json
import re
import shutil
import socket
import threading
import time

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from conftest import (WARNING_LATENCY, MlflowServer, first_tracking_warning, free_port,
                      recoveries, timed_warnings)
from proxy import SlowProxy
from gaptrack import publish as publish_module
from gaptrack.cli import main
from gaptrack.spool import spool_root
from gaptrack.sync import sync
from gaptrack.tracking import RunLogger, TrackingWarning
from gaptrack.uris import describe_failure, redact_uri


def point_counts(client, run_id, keys):
    return {k: [p.step for p in client.get_metric_history(run_id, k)] for k in keys}


def test_large_batches_arrive_whole_and_the_spool_is_removed(sqlite_uri):
    # 2500 metrics in one log_metrics: more than MLflow takes in one request
    # (1000); its client splits them.
    logger = RunLogger()
    metrics = {f"m/{i}": float(i) for i in range(2500)}
    logger.log_metrics(metrics, step=3)
    logger.log_table(pd.DataFrame({"a": [1.5, 2.5]}), "tables/t.parquet")
    spool = logger.spool.dir
    assert spool.parent == spool_root() and spool.exists()
    assert logger.close()
    assert not spool.exists()
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == metrics
    local = mlflow.artifacts.download_artifacts(run_id=logger.run_id, artifact_path="tables/t.parquet")
    assert pd.read_parquet(local)["a"].tolist() == [1.5, 2.5]


def test_artifact_paths_cannot_leave_the_run(sqlite_uri):
    logger = RunLogger()
    frame = pd.DataFrame({"a": [1]})
    for bad in ("../x.parquet", "/etc/x.parquet", "a/../../x.parquet"):
        with pytest.raises(ValueError, match="relative file path inside the run"):
            logger.log_table(frame, bad)
    with pytest.raises(ValueError, match="relative file path inside the run, got '../up/f.txt'"):
        logger.log_bytes(b"x", "../up/f.txt")
    logger.close()


def test_credentials_are_not_spooled_nor_shown(monkeypatch):
    assert redact_uri("http://alice:s3cret@127.0.0.1:5000/x") == "http://127.0.0.1:5000/x"
    assert redact_uri("sqlite:///tmp/a.db") == "sqlite:///tmp/a.db"
    text, _ = describe_failure(MlflowException(
        "API request to http://alice:s3cret@127.0.0.1:9/api/2.0/mlflow/runs/create failed"))
    assert text == ("MlflowException: API request to "
                    "http://127.0.0.1:9/api/2.0/mlflow/runs/create failed")
    # A server that never answers: the spool and every warning name it without the password.
    mlflow.set_tracking_uri(f"http://alice:s3cret@127.0.0.1:{free_port()}")
    try:
        logger = RunLogger(close_timeout=0.5)
        logger.log_metrics({"gap/loss": 0.25}, step=0)
        with pytest.warns(TrackingWarning) as warned:
            assert not logger.close()
    finally:
        mlflow.set_tracking_uri(None)
    assert "127.0.0.1" in (logger.spool.dir / "meta.json").read_text()
    assert "s3cret" not in (logger.spool.dir / "meta.json").read_text()
    assert warned and not any("s3cret" in str(w.message) for w in warned)


def _train(epochs, tracker_kwargs=None, callbacks=()):
    keras.utils.set_random_seed(0)
    x, y = blobs(48)
    model = mlp(bn=True)
    tracker = gaptrack.GapTracker((x, y), batch_size=16, **(tracker_kwargs or {}))
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                        callbacks=[tracker, *callbacks])
    return tracker, history


def test_server_unreachable_for_the_whole_run_then_sync(mlflow_server, tmp_path, monkeypatch):
    """Nothing listens at the tracking URI: training completes, warned at once;
    ``gaptrack sync`` against a server that never answers fails within 60 s in
    one line, nothing lost; then a server appears at that address (a proxy to a
    real one) and sync sends every point once, however often it is run."""
    monkeypatch.chdir(tmp_path)
    port = free_port()
    reported = []  # the history the train-end report is built from (the tracker's own copy)
    build_report = publish_module.build_report
    monkeypatch.setattr(publish_module, "build_report",
                        lambda history: reported.append(history) or build_report(history))
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        with timed_warnings() as seen:
            started = time.monotonic()
            tracker, history = _train(3, {"close_timeout": 1.0})
            took = time.monotonic() - started
        assert len(history.history["loss"]) == 3  # training completed
        assert first_tracking_warning(seen, started, timeout=0) < WARNING_LATENCY
        assert "gaptrack sync" in seen[-1][2] and seen[-1][1] is TrackingWarning
        assert took < 30.0  # the tiny training, and its close timeout (1 s)
        spool = tracker.logger.spool.dir
        assert spool.exists() and tracker.run_id is None
        meta = json.loads((spool / "meta.json").read_text())
        assert meta["tracking_uri"] == f"http://127.0.0.1:{port}"
        kept = (spool / "ops.log").read_bytes()
        backup = tmp_path / "spool-copy"
        shutil.copytree(spool, backup)

        with socket.socket() as silent:  # accepts connections, never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            start = time.monotonic()
            result = CliRunner().invoke(main, ["sync", str(spool), "--tracking-uri",
                                               f"http://127.0.0.1:{silent.getsockname()[1]}"])
            assert time.monotonic() - start < 60.0
        assert result.exit_code == 1
        [line] = result.output.splitlines()
        assert line.startswith(f"run not created: 0 operation(s) sent from {spool}, then stopped")
        assert line.endswith("/api/2.0/mlflow/runs/create failed: no answer in time")
        assert (spool / "ops.log").read_bytes() == kept and not (spool / "acked").exists()

        proxy = SlowProxy(int(mlflow_server.url.rsplit(":", 1)[1]), delay=0.0, port=port)
        try:
            [(directory, run_id, sent, error)] = sync(spool.parent)
            assert error is None
            assert directory == str(spool) and sent > 0 and not spool.exists()
            assert sync(spool.parent) == []  # a second sync adds nothing
            # replaying the same operations (acks lost) adds nothing either
            [(_, same_run, resent, _)] = sync(_with_run_id(backup, run_id))
            assert same_run == run_id and resent == sent
        finally:
            proxy.close()
        client = MlflowClient(mlflow_server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = point_counts(client, run_id, ["fit/loss", "gap/loss", "eval_train/accuracy",
                                              "precise_bn/loss"])
        assert all(s == [0, 1, 2] for s in steps.values()), steps
        assert [p.value for p in client.get_metric_history(run_id, "fit/loss")] == \
            history.history["loss"]
        df = gaptrack.load_bn_snapshots(run_id, tracking_uri=mlflow_server.url)
        assert sorted(df.epoch.unique()) == [0, 1, 2]
        assert run.data.tags["gaptrack.probe_size"] == "48"
        # the report made while the server was away had the run's own tags
        [local] = reported
        assert local.tags == {k: run.data.tags[k] for k in local.tags}
        assert {"gaptrack.batch_size", "gaptrack.bn_worst_layer"} <= set(local.tags)
        assert {r.step: r.fit["loss"] for r in local.records} == {
            p.step: p.value for p in client.get_metric_history(run_id, "fit/loss")}
    finally:
        mlflow.set_tracking_uri(None)


def _with_run_id(spool_copy, run_id):
    """The copied spool as if the first sync had created the run, acks lost."""
    meta = json.loads((spool_copy / "meta.json").read_text())
    meta["run_id"] = run_id
    (spool_copy / "meta.json").write_text(json.dumps(meta))
    return spool_copy


def test_server_killed_mid_training_and_restarted(tmp_path, monkeypatch, caplog):
    """Killed after epoch 2 of 10 and restarted on the same store a few seconds
    later: a warning within 15 s of the kill, one line when it is back, and every
    epoch's metrics and snapshots reach it exactly once."""
    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server").start()
    mlflow.set_tracking_uri(server.url)
    restarted, killed = [], []

    def restart_later():
        time.sleep(3)
        server.start()
        restarted.append(time.monotonic())

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                killed.append(time.monotonic())
                server.stop()
                threading.Thread(target=restart_later, daemon=True).start()

    class EndTimer(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.start = time.monotonic()

    try:
        timer = EndTimer()
        with timed_warnings() as seen:
            tracker, history = _train(10, {"close_timeout": 120.0}, callbacks=[Kill(), timer])
        finished = time.monotonic()
        assert restarted and len(history.history["loss"]) == 10
        assert first_tracking_warning(seen, killed[0], timeout=0) < WARNING_LATENCY
        assert len(recoveries(caplog)) == 1
        # train end waited for the server at most the retry budget
        assert finished - timer.start < 120.0
        client = MlflowClient(server.url)
        keys = ["fit/loss", "gap/loss", "gap/loss/bn_ema", "train_mode/accuracy"]
        steps = point_counts(client, tracker.run_id, keys)
        assert all(s == list(range(10)) for s in steps.values()), steps
        df = gaptrack.load_bn_snapshots(tracker.run_id, tracking_uri=server.url)
        assert sorted(df.epoch.unique()) == list(range(10))
        assert (df.groupby("epoch").size() == df.groupby("epoch").size().iloc[0]).all()
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert not tracker.logger.spool.dir.exists()
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)


def _png(width, height, color):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_run_known_images_by_step_and_a_description_that_never_overwrites_the_users(
        server_uri, monkeypatch):
    """wait_for_run names the run; log_image stores step images as
    ``mlflow.log_image(key=, step=)`` does (compared with MLflow's own), setting
    the run's images tag once, not with every image; the description is
    gaptrack's until the user writes one."""
    import requests

    tagged = []  # the requests that set the run's images tag
    real = requests.Session.request

    def counting(self, method, url, *args, **kwargs):
        tags = (kwargs.get("json") or {}).get("tags", [])
        tagged.extend(url for t in tags if t["key"] == "mlflow.loggedImages")
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", counting)
    client = MlflowClient(server_uri)
    logger = RunLogger()
    run_id, run_name = logger.wait_for_run(60.0)
    assert (run_id, run_name) == (logger.run_id, client.get_run(run_id).info.run_name)
    images = {step: _png(400, 300, (40 * step, 0, 0)) for step in (0, 1)}
    for step, image in images.items():
        logger.log_image(image, "gaptrack.decomposition", step=step)
    with pytest.raises(ValueError, match="image key must be letters, digits, .* got 'a:b'"):
        logger.log_image(images[0], "a:b", step=0)
    logger.set_description("first")
    logger.set_description("second")  # replaces what gaptrack wrote
    assert logger.close()
    assert len(tagged) == 1 and tagged[0].endswith("/runs/log-batch"), tagged
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.note.content"] == "second"
    # a description the user wrote is kept
    client.set_tag(run_id, "mlflow.note.content", "mine")
    joined = RunLogger(run_id=run_id)
    joined.set_description("third")
    assert joined.close() and not joined.owns_run
    assert client.get_run(run_id).data.tags["mlflow.note.content"] == "mine"

    reference = client.create_run(run.info.experiment_id).info.run_id
    client.log_image(reference, np.zeros((300, 400, 3), dtype=np.uint8),
                     key="gaptrack.decomposition", step=0)

    def stored(run):
        """``{(step, ".png" or "+compressed.webp"): artifact path}`` of the run's images."""
        pattern = re.compile(r"images/gaptrack\.decomposition\+step\+(\d+)\+timestamp\+\d+"
                             r"\+[0-9a-f-]{36}(\.png|\+compressed\.webp)")
        return {pattern.fullmatch(f.path).groups(): f.path
                for f in client.list_artifacts(run, "images")}

    ours = stored(run_id)
    assert sorted(ours) == [("0", "+compressed.webp"), ("0", ".png"), ("1", "+compressed.webp"),
                            ("1", ".png")]
    assert sorted(stored(reference)) == [("0", "+compressed.webp"), ("0", ".png")]
    assert run.data.tags["mlflow.loggedImages"] == \
        client.get_run(reference).data.tags["mlflow.loggedImages"]
    for step, image in images.items():
        with open(client.download_artifacts(run_id, ours[str(step), ".png"]), "rb") as f:
            assert f.read() == image
