"""RunLogger and sync: spooled, background, retried, exactly once on the server."""

import json
import shutil
import threading
import time

import keras
import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from conftest import MlflowServer, free_port
from gaptrack import callback as callback_module
from gaptrack.spool import spool_root
from gaptrack.sync import SyncError, sync
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


def test_artifact_paths_cannot_leave_the_run(sqlite_uri, tmp_path):
    logger = RunLogger()
    frame = pd.DataFrame({"a": [1]})
    for bad in ("../x.parquet", "/etc/x.parquet", "a/../../x.parquet"):
        with pytest.raises(ValueError, match="relative file path inside the run"):
            logger.log_table(frame, bad)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="relative path inside the run, got '../up'"):
        logger.log_artifact(str(tmp_path / "f.txt"), "../up")
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


def test_server_unreachable_for_the_whole_run_then_sync(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    reported = []  # the history the train-end report is built from (the tracker's own copy)
    log_report = callback_module.log_report
    monkeypatch.setattr(callback_module, "log_report",
                        lambda logger, history: reported.append(history) or log_report(logger, history))
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        with pytest.warns(TrackingWarning, match="gaptrack sync"):
            tracker, history = _train(3, {"close_timeout": 1.0})
        assert len(history.history["loss"]) == 3  # training completed
        spool = tracker.logger.spool.dir
        assert spool.exists() and tracker.run_id is None
        meta = json.loads((spool / "meta.json").read_text())
        assert meta["tracking_uri"] == f"http://127.0.0.1:{port}"
        backup = tmp_path / "spool-copy"
        shutil.copytree(spool, backup)

        server = MlflowServer(tmp_path / "server", port=port).start()
        try:
            [(directory, run_id, sent, error)] = sync(spool.parent)
            assert error is None
            assert directory == str(spool) and sent > 0 and not spool.exists()
            assert sync(spool.parent) == []  # a second sync adds nothing
            # replaying the same operations (acks lost) adds nothing either
            [(_, same_run, resent, _)] = sync(_with_run_id(backup, run_id))
            assert same_run == run_id and resent == sent
            client = MlflowClient(server.url)
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED"
            steps = point_counts(client, run_id, ["fit/loss", "gap/loss", "eval_train/accuracy",
                                                  "precise_bn/loss"])
            assert all(s == [0, 1, 2] for s in steps.values()), steps
            assert [p.value for p in client.get_metric_history(run_id, "fit/loss")] == \
                history.history["loss"]
            df = gaptrack.load_bn_snapshots(run_id, tracking_uri=server.url)
            assert sorted(df.epoch.unique()) == [0, 1, 2]
            assert run.data.tags["gaptrack.probe_size"] == "48"
            # the report made while the server was away had the run's own tags
            [local] = reported
            assert local.tags == {k: run.data.tags[k] for k in local.tags}
            assert {"gaptrack.batch_size", "gaptrack.bn_worst_layer"} <= set(local.tags)
            assert local.metrics["fit/loss"] == {
                p.step: p.value for p in client.get_metric_history(run_id, "fit/loss")}
        finally:
            server.stop()
    finally:
        mlflow.set_tracking_uri(None)


def _with_run_id(spool_copy, run_id):
    """The copied spool as if the first sync had created the run, acks lost."""
    meta = json.loads((spool_copy / "meta.json").read_text())
    meta["run_id"] = run_id
    (spool_copy / "meta.json").write_text(json.dumps(meta))
    return spool_copy


def test_server_killed_mid_training_and_restarted(tmp_path, monkeypatch):
    """Killed after epoch 2 of 10 and restarted on the same store a few seconds
    later: every epoch's metrics and snapshots reach it exactly once."""
    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server").start()
    mlflow.set_tracking_uri(server.url)
    restarted = []

    def restart_later():
        time.sleep(3)
        server.start()
        restarted.append(time.monotonic())

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                server.stop()
                threading.Thread(target=restart_later, daemon=True).start()

    class EndTimer(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            self.start = time.monotonic()

    try:
        timer = EndTimer()
        with pytest.warns(TrackingWarning):
            tracker, history = _train(10, {"close_timeout": 60.0}, callbacks=[Kill(), timer])
        finished = time.monotonic()
        assert restarted and len(history.history["loss"]) == 10
        # train end waited for the server at most the retry budget
        assert finished - timer.start < 60.0
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


def test_sync_refuses_a_spool_that_points_outside_itself(tmp_path, sqlite_uri):
    spool = tmp_path / "spool" / "abc"
    (spool / "files").mkdir(parents=True)
    (spool / "meta.json").write_text(json.dumps(
        {"tracking_uri": sqlite_uri, "run_id": None, "experiment_id": "0"}))
    (spool / "ops.jsonl").write_text(json.dumps(
        {"seq": 0, "type": "artifact", "path": "../../../etc/passwd", "dir": None}) + "\n")
    with pytest.raises(SyncError, match="outside it"):
        sync(spool)
    with pytest.raises(SyncError, match="does not exist"):
        sync(tmp_path / "nope")


def test_gaptrack_sync_command(tmp_path, monkeypatch):
    """Spooled while the server is unreachable, then `gaptrack sync` sends it to a
    store given on the command line; a second call has nothing to send."""
    from click.testing import CliRunner

    from gaptrack.cli import main

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    try:
        logger = RunLogger(close_timeout=0.5)
        logger.log_metrics({"gap/loss": 0.25, "fit/loss": 1.0}, step=0)
        logger.log_metrics({"gap/loss": 0.125, "fit/loss": 0.5}, step=1)
        with pytest.warns(TrackingWarning, match="gaptrack sync"):
            assert not logger.close()
    finally:
        mlflow.set_tracking_uri(None)
    store = f"sqlite:///{tmp_path / 'late.db'}"
    runner = CliRunner()
    result = runner.invoke(main, ["sync", str(logger.spool.dir), "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    [line] = [l for l in result.output.splitlines() if "sent from" in l]
    run_id, rest = line.split(":", 1)
    assert "3 operation(s) sent" in rest  # two metric batches and the end of the run
    client = MlflowClient(store)
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, "gap/loss")] == \
        [(0, 0.25), (1, 0.125)]
    assert client.get_run(run_id).info.status == "FINISHED"
    again = runner.invoke(main, ["sync", "--tracking-uri", store])
    assert again.exit_code == 0 and "nothing to sync" in again.output
    bad = runner.invoke(main, ["sync", str(tmp_path / "missing")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    bad = runner.invoke(main, ["sync", "--tracking-uri", "htp:/x"])
    assert bad.exit_code == 1 and "'htp:/x' has no usable scheme; accepted" in bad.output
