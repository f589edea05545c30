"""The sender under MLflow's default HTTP settings (no ``MLFLOW_HTTP_REQUEST_*``
is set): a hung server and a slow one. What training waits, when the user hears
of an outage, and that every point is on the server exactly once."""

import os
import signal
import statistics
import time

import keras
import mlflow
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from conftest import (WARNING_LATENCY, MlflowServer, first_tracking_warning, recoveries,
                      timed_warnings)
from gaptrack.sync import sync
from gaptrack.tracking import RunLogger, TrackingWarning
from proxy import SlowProxy

#: Seconds the training thread may spend in the tracker's logging calls per epoch.
EPOCH_COST = 0.010
#: Seconds of wall time within which a logging call has not waited for a request
#: through the proxy (each takes 2 s there). Other threads of the tracker, the
#: epoch images' for one, hold Python's lock at times, so the training thread's
#: cost is its CPU time (:data:`EPOCH_COST`) and its wall time shows whether it waited.
NO_WAIT = 0.5


def test_mlflow_http_settings_are_the_defaults():
    assert not [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]


def points(client, run_id, key):
    return [(p.step, p.value) for p in client.get_metric_history(run_id, key)]


def test_hung_server_is_a_warning_within_15_s_and_loses_nothing(tmp_path, monkeypatch, caplog):
    """The server is frozen (SIGSTOP) after step 0 and thawed (SIGCONT) once the
    warning is out: logging calls return at once, the warning comes within 15 s
    (the sender's 10 s request timeout), one line says the server is back, and
    every point is on the server once."""
    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server").start()
    mlflow.set_tracking_uri(server.url)
    try:
        with timed_warnings() as seen:
            logger = RunLogger(close_timeout=60.0)
            run_id, run_name = logger.wait_for_run(60.0)
            assert run_id == logger.run_id and run_name
            logger.log_metrics({"gap/loss": 0.5}, step=0)
            assert logger.flush(60.0)
            os.killpg(server.proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            costs = []
            for step in (1, 2, 3):
                start = time.perf_counter()
                logger.log_metrics({"gap/loss": 0.5 / (step + 1), "fit/loss": float(step)}, step)
                costs.append(time.perf_counter() - start)
            latency = first_tracking_warning(seen, frozen, timeout=30.0)
            os.killpg(server.proc.pid, signal.SIGCONT)
            assert logger.close()
        assert latency is not None and latency < WARNING_LATENCY, latency
        assert max(costs) < EPOCH_COST, costs
        assert len([w for w in seen if w[1] is TrackingWarning]) == 1  # once per outage
        assert len(recoveries(caplog)) == 1
        client = MlflowClient(server.url)
        assert points(client, run_id, "gap/loss") == [(s, 0.5 / (s + 1)) for s in range(4)]
        assert points(client, run_id, "fit/loss") == [(s, float(s)) for s in (1, 2, 3)]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if server.proc is not None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()
        mlflow.set_tracking_uri(None)


def test_slow_server_costs_training_nothing(mlflow_server, tmp_path, monkeypatch):
    """Every request held 2 s by a proxy: the training thread spends less than
    10 ms per epoch in the tracker's logging calls and does not wait at train
    begin; train end waits its close timeout, then the sender hands the spool
    over to ``gaptrack sync``, which waits for the request in flight and sends
    the rest: every epoch once on the server."""
    monkeypatch.chdir(tmp_path)
    proxy = SlowProxy(int(mlflow_server.url.rsplit(":", 1)[1]), delay=2.0)
    spent = []  # (method, (wall seconds, CPU seconds)) in the training thread

    def timed(name):
        original = getattr(RunLogger, name)

        def wrapper(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent.append((name, (time.perf_counter() - start, time.thread_time() - cpu)))
        monkeypatch.setattr(RunLogger, name, wrapper)

    for name in ("__init__", "set_tags", "log_metrics", "log_table"):
        timed(name)

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            spent.append(("epoch", epoch))

        def on_train_end(self, logs=None):
            spent.append(("end", time.monotonic()))

    mlflow.set_tracking_uri(proxy.url)
    try:
        keras.utils.set_random_seed(0)
        x, y = blobs(48)
        tracker = gaptrack.GapTracker((x, y), batch_size=16, close_timeout=3.0)
        with timed_warnings() as seen:
            history = mlp(bn=True).fit(x, y, batch_size=16, epochs=6, verbose=0,
                                       callbacks=[tracker, EpochEnd()])
            returned = time.monotonic()
        train_end = next(t for name, t in spent if name == "end")
        wall, cpu, current = [], [], (0.0, 0.0)
        for name, value in spent:
            if name == "epoch":
                wall.append(current[0])
                cpu.append(current[1])
                current = (0.0, 0.0)
            elif name != "end":
                current = (current[0] + value[0], current[1] + value[1])
        # epoch 0 also holds the logger's creation (imports included) and the first
        # Parquet write: the measure is the epochs after it
        assert statistics.median(cpu[1:]) < EPOCH_COST, cpu
        assert max(wall[1:]) < NO_WAIT, wall
        assert wall[0] < 2.0, wall  # no request at train begin (each takes 2 s)
        assert returned - train_end < 3.0 + 2.5  # the close timeout, and the report's work
        assert [text for _, c, text in seen if c is TrackingWarning] == [
            text for _, c, text in seen if "gaptrack sync" in text]  # only the hand-over
        spool = tracker.logger.spool.dir
        assert spool.exists()
        [(directory, run_id, sent, error)] = sync(spool, tracking_uri=mlflow_server.url)
        assert error is None and sent > 0 and not spool.exists()
        assert run_id == tracker.run_id
        client = MlflowClient(mlflow_server.url)
        assert points(client, run_id, "fit/loss") == list(enumerate(history.history["loss"]))
        assert [s for s, _ in points(client, run_id, "gap/loss")] == list(range(6))
        df = gaptrack.load_bn_snapshots(run_id, tracking_uri=mlflow_server.url)
        assert sorted(df.epoch.unique()) == list(range(6))
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        proxy.close()
        mlflow.set_tracking_uri(None)
