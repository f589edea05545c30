"""gaptrack sync: sends what training could not, once, never beside a running
sender; refuses a spool that points outside itself."""

import json

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from conftest import free_port
from gaptrack import sync as sync_module
from gaptrack.cli import main
from gaptrack.sync import SyncError, sync
from gaptrack.tracking import RunLogger, TrackingWarning


def test_sync_never_sends_a_spool_its_training_is_sending(sqlite_uri, monkeypatch):
    """While its logger lives, a spool is locked: sync reports it and sends
    nothing; once the logger has closed (server away), sync sends it all."""
    monkeypatch.setattr(sync_module, "LOCK_WAIT", 0.5)
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")
    logger = RunLogger(close_timeout=0.5)
    logger.log_metrics({"gap/loss": 0.25}, step=0)
    [(directory, run_id, sent, error)] = sync(logger.spool.dir, tracking_uri=sqlite_uri)
    assert (run_id, sent) == (None, 0)
    assert error == "a running training is sending it (it holds the spool's lock)"
    assert logger.spool.dir.exists() and not (logger.spool.dir / "acked").exists()
    with pytest.warns(TrackingWarning, match="gaptrack sync"):
        assert not logger.close()
    [(directory, run_id, sent, error)] = sync(logger.spool.dir, tracking_uri=sqlite_uri)
    assert error is None and sent == 2 and not logger.spool.dir.exists()
    client = MlflowClient(sqlite_uri)
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, "gap/loss")] == [
        (0, 0.25)]
    assert client.get_run(run_id).info.status == "FINISHED"


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
    runner = CliRunner()
    # the server is still down: one line, exit status 1, nothing lost
    down = runner.invoke(main, ["sync", str(logger.spool.dir)])
    assert down.exit_code == 1
    [line] = down.output.splitlines()
    assert line.endswith("/api/2.0/mlflow/runs/create failed: Connection refused"), line
    assert logger.spool.dir.exists() and not (logger.spool.dir / "acked").exists()
    store = f"sqlite:///{tmp_path / 'late.db'}"
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
