"""GapTracker end to end: what reaches the store, against History, evaluate and numpy."""

import math
import time
import warnings

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

import gaptrack
from builders import OwnLoss, blobs, mlp
from conftest import WARNING_LATENCY, first_tracking_warning, timed_warnings
from gaptrack.fitparams import BatchSizeWarning, guess_batch_size, infer_batch_size
from gaptrack.tracking import TrackingWarning
from proxy import SlowProxy

PARTS = ("drift", "mode", "bn_ema")


def histories(client, run_id):
    """``{key: {step: value}}`` of every metric of a run, and the raw point counts."""
    run = client.get_run(run_id)
    out, counts = {}, {}
    for key in run.data.metrics:
        points = client.get_metric_history(run_id, key)
        counts[key] = len(points)
        out[key] = {p.step: p.value for p in points}
    return out, counts


def spec_keys(metrics, bn_keys=(), val=False):
    keys = []
    for m in metrics:
        keys += [f"fit/{m}", f"eval_train/{m}", f"train_mode/{m}", f"gap/{m}"]
        keys += [f"gap/{m}/{p}" for p in PARTS]
        if bn_keys:
            keys.append(f"precise_bn/{m}")
        if val:
            keys.append(f"val/{m}")
    for k in bn_keys:
        keys += [f"staleness/mean/{k}", f"staleness/var/{k}"]
    return keys


@pytest.mark.parametrize("store", [
    "sqlite_uri",
    # the same computation over HTTP: the other backends' runs leave it out
    pytest.param("server_uri", marks=pytest.mark.backend_independent),
])
def test_every_key_at_every_epoch_matches_history_and_evaluate(store, request):
    request.getfixturevalue(store)
    keras.utils.set_random_seed(0)
    x, y = blobs(240)
    xv, yv = blobs(60, seed=1)
    model = mlp(bn=True, dropout=0.2)
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    epochs = 3
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_data=(xv, yv),
                        verbose=0, callbacks=[tracker])
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"  # it started the run, so it ended it
    logged, counts = histories(client, tracker.run_id)
    bn_names = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bn_names) == 2
    expected = spec_keys(["loss", "accuracy"], bn_keys=bn_names, val=True)
    for key in expected:
        assert sorted(logged[key]) == list(range(epochs)), key
        assert counts[key] == epochs, key  # each point exactly once
    for m in ("loss", "accuracy"):
        assert [logged[f"fit/{m}"][e] for e in range(epochs)] == history.history[m]
        assert [logged[f"val/{m}"][e] for e in range(epochs)] == history.history[f"val_{m}"]
        for e in range(epochs):
            parts = sum(logged[f"gap/{m}/{p}"][e] for p in PARTS)
            assert parts == pytest.approx(logged[f"gap/{m}"][e], abs=1e-12)
            assert logged[f"gap/{m}"][e] == pytest.approx(
                logged[f"fit/{m}"][e] - logged[f"eval_train/{m}"][e], abs=1e-12)
    # the last epoch's eval_train is the trained model's evaluate()
    final = model.evaluate(x, y, verbose=0, return_dict=True)
    for m in ("loss", "accuracy"):
        assert logged[f"eval_train/{m}"][epochs - 1] == pytest.approx(final[m], rel=1e-5)
    # run-level summaries against numpy on the logged gaps
    for m in ("loss", "accuracy"):
        gaps = np.array([logged[f"gap/{m}"][e] for e in range(epochs)])
        assert run.data.metrics[f"gap_final/{m}"] == gaps[-1]
        assert run.data.metrics[f"gap_max_abs/{m}"] == pytest.approx(np.abs(gaps).max())
        assert run.data.metrics[f"gap_mean_abs/{m}"] == pytest.approx(np.abs(gaps).mean())
    tags = run.data.tags
    assert tags["gaptrack.version"] == gaptrack.__version__
    assert tags["gaptrack.probe_size"] == "240"
    assert tags["gaptrack.batch_size"] == "32"
    last = {p: abs(logged[f"gap/loss/{p}"][epochs - 1]) for p in PARTS}
    assert tags["gaptrack.diagnosis"] == max(last, key=last.get)


def _fit(tracked, epochs=2):
    keras.utils.set_random_seed(5)
    x, y = blobs(96)
    model = mlp(bn=True, dropout=0.3)
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs))

    callbacks = [gaptrack.GapTracker((x[:72], y[:72]), batch_size=16)] if tracked else []
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
                        validation_split=0.25, callbacks=callbacks + [Recorder()])
    return history.history, seen, [v.numpy() for v in model.variables]


def test_tracking_does_not_disturb_training(sqlite_uri):
    plain_history, plain_seen, plain_weights = _fit(tracked=False)
    history, seen, weights = _fit(tracked=True)
    assert history == plain_history
    assert seen == plain_seen
    for a, b in zip(weights, plain_weights):
        assert a.tobytes() == b.tobytes()


def test_one_log_batch_request_per_epoch(sqlite_uri, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    calls = []
    real = SqlAlchemyStore.log_batch  # the store the sender writes to

    def counting(self, run_id, metrics, params, tags):
        calls.append(sorted({m.step for m in metrics}) if metrics else "tags")
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", counting)
    x, y = blobs(64)
    model = mlp()
    model.fit(x, y, batch_size=16, epochs=3, verbose=0,
              callbacks=[gaptrack.GapTracker((x, y), batch_size=16)])
    metric_calls = [c for c in calls if c != "tags"]
    # one request per epoch, carrying that epoch's step only, then the run summary
    assert metric_calls == [[0], [1], [2], [0]]


def test_joins_the_active_run(sqlite_uri):
    x, y = blobs(48)
    model = mlp()
    with mlflow.start_run() as run:
        mlflow.log_param("mine", 1)
        tracker = gaptrack.GapTracker((x, y), batch_size=16)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tracker])
        assert tracker.run_id == run.info.run_id
        assert mlflow.active_run().info.run_id == run.info.run_id  # not ended by it
    data = MlflowClient().get_run(run.info.run_id).data
    assert "gap/loss" in data.metrics and data.params == {"mine": "1"}


def test_every_nth_epoch_and_the_last(sqlite_uri):
    x, y = blobs(48)
    model = mlp()
    tracker = gaptrack.GapTracker((x, y), batch_size=16, every=2)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[tracker])
    logged, _ = histories(MlflowClient(), tracker.run_id)
    assert sorted(logged["fit/loss"]) == [0, 1, 2, 3]
    assert sorted(logged["gap/loss"]) == [0, 2, 3]


def test_batch_size_inference():
    assert list(infer_batch_size(1000, 16)) == [63, 64, 65, 66]
    for samples, batch in [(100, 5), (1000, 7), (60000, 32), (37, 37), (37, 100)]:
        steps = math.ceil(samples / batch)
        candidates = infer_batch_size(samples, steps)
        if steps == 1:  # every b >= samples fits; all give the one same batch
            assert list(candidates) == [samples]
            continue
        # an independent brute force over every batch size
        assert list(candidates) == [b for b in range(1, samples + 1)
                                    if math.ceil(samples / b) == steps]
    x, y = blobs(100)
    tracker = gaptrack.GapTracker((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchSizeWarning)  # unambiguous: no warning
        assert guess_batch_size(tracker.probe, 20) == 5
    x, y = blobs(1000)
    tracker = gaptrack.GapTracker((x, y))
    with pytest.warns(BatchSizeWarning, match="1000 samples in 16 steps fits batch sizes 63 to 66"):
        assert guess_batch_size(tracker.probe, 16) == 63
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
    assert guess_batch_size(gaptrack.GapTracker(dataset).probe, 20) == 50


def test_textbook_cases(sqlite_uri):
    """Single-batch epoch: drift is the whole gap; Dropout: mode dominates;
    deep BN after 2 steps: bn_ema dominates."""
    client = MlflowClient()

    def run(model, x, y, batch_size, epochs):
        tracker = gaptrack.GapTracker((x, y), batch_size=batch_size)
        model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[tracker])
        return client.get_run(tracker.run_id).data

    keras.utils.set_random_seed(0)
    x, y = blobs(32)
    model = mlp(l2=0.01)
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    data = run(model, x, y, 32, 1)
    assert data.metrics["fit/loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert data.metrics["gap/loss/drift"] == pytest.approx(data.metrics["gap/loss"], abs=1e-7)
    assert data.metrics["gap/loss/mode"] == 0 and data.metrics["gap/loss/bn_ema"] == 0
    assert data.tags["gaptrack.diagnosis"] == "drift"

    keras.utils.set_random_seed(0)
    x, y = blobs(512)
    data = run(mlp(dropout=0.5, width=64, lr=1e-3), x, y, 32, 3)
    mode = abs(data.metrics["gap/loss/mode"])
    assert mode > abs(data.metrics["gap/loss/drift"]) and data.metrics["gap/loss/bn_ema"] == 0
    assert data.tags["gaptrack.diagnosis"] == "mode"

    keras.utils.set_random_seed(0)
    data = run(mlp(bn=True, depth=8, width=32, lr=1e-4), x, y, 256, 1)  # 2 steps
    bn_ema = abs(data.metrics["gap/loss/bn_ema"])
    assert bn_ema > abs(data.metrics["gap/loss/drift"])
    assert bn_ema > abs(data.metrics["gap/loss/mode"])
    assert data.tags["gaptrack.diagnosis"] == "bn_ema"


def test_custom_loop_with_train_on_batch(sqlite_uri):
    keras.utils.set_random_seed(0)
    x, y = blobs(64)
    model = mlp()
    rng = np.random.default_rng(0)
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    reported = []
    with tracker.track(model):
        for step in range(3):
            idx = rng.choice(len(x), 32, replace=False)
            logs = model.train_on_batch(x[idx], y[idx], return_dict=True)
            reported.append(logs)
            tracker.log_epoch(step, logs)
    logged, _ = histories(MlflowClient(), tracker.run_id)
    assert [logged["fit/loss"][s] for s in range(3)] == [float(r["loss"]) for r in reported]
    final = model.evaluate(x, y, verbose=0, return_dict=True)
    assert logged["eval_train/loss"][2] == pytest.approx(final["loss"], rel=1e-5)
    assert MlflowClient().get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.backend_independent  # the tracking server's outage, not the measurements
def test_tracking_failure_is_a_warning_and_is_retried(mlflow_server, tmp_path, monkeypatch):
    """The server goes down after epoch 0 and comes back after epoch 1's attempt:
    training carries on, and every epoch reaches the server exactly once. The
    server is the session's, behind a proxy that goes down (it stops listening
    and cuts its open connections) and comes back on the same port: to the
    client, a server that went down and restarted (tests/test_tracking.py kills
    and restarts a server process itself)."""
    monkeypatch.chdir(tmp_path)
    upstream = int(mlflow_server.url.rsplit(":", 1)[1])
    server = SlowProxy(upstream, delay=0.0)
    mlflow.set_tracking_uri(server.url)
    try:
        x, y = blobs(48)
        model = mlp()
        tracker = gaptrack.GapTracker((x, y), batch_size=16)

        down = []

        class Outage(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                nonlocal server
                if epoch == 0:
                    server.close()
                    down.append(time.monotonic())
                elif epoch == 1:
                    assert tracker.logger.pending > 0  # kept, not dropped
                    # back once the outage was noticed (its one warning)
                    assert first_tracking_warning(seen, down[0], WARNING_LATENCY) is not None
                    server = SlowProxy(upstream, delay=0.0, port=server.port)

        with timed_warnings() as seen:
            history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                                callbacks=[tracker, Outage()])
        warned = [text for _, category, text in seen if category is TrackingWarning]
        assert len(warned) == 1 and "kept and retried" in warned[0], warned
        assert len(history.history["loss"]) == 3
        logged, counts = histories(MlflowClient(), tracker.run_id)
        for key in ("fit/loss", "gap/loss", "eval_train/accuracy"):
            assert sorted(logged[key]) == [0, 1, 2] and counts[key] == 3
        assert logged["fit/loss"] == dict(enumerate(history.history["loss"]))
    finally:
        server.close()
        mlflow.set_tracking_uri(None)


def test_the_run_describes_itself_and_steps_its_charts_in_the_ui(sqlite_uri):
    """The report's headline is the run's description (shown on its Overview),
    rebuilt from the store it is the same text; each measured epoch has its two
    step images, which MLflow's image charts step through."""
    from click.testing import CliRunner

    from gaptrack.cli import main

    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    tracker = gaptrack.GapTracker((x, y), batch_size=32, every=2)
    mlp(bn=True, dropout=0.2).fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[tracker])
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**gaptrack diagnosis: `{run.data.tags['gaptrack.diagnosis']}`**")
    printed = CliRunner().invoke(main, ["report", tracker.run_id]).output
    sentence = next(line for line in printed.splitlines() if line.startswith("At epoch 2"))
    assert sentence in note and "**What to do:**" in note
    images = sorted(f.path.split("/")[-1] for f in client.list_artifacts(tracker.run_id, "images"))
    steps = {}
    for name in images:
        key, _, step, *_ = name.split("+")
        steps.setdefault(key, set()).add(int(step))
    assert steps == {"gaptrack.decomposition": {0, 2}, "gaptrack.bn_staleness": {0, 2}}

    # a description the user wrote is kept when the tracker runs again on the run
    client.set_tag(tracker.run_id, "mlflow.note.content", "my notes")
    again = gaptrack.GapTracker((x, y), batch_size=32, run_id=tracker.run_id)
    mlp().fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[again])
    assert client.get_run(tracker.run_id).data.tags["mlflow.note.content"] == "my notes"


def _stopper(**kwargs):
    """EarlyStopping that finds every later epoch worse (mode "max" on a falling
    loss): its best epoch is the first it considers, and it stops ``patience``
    epochs later."""
    return keras.callbacks.EarlyStopping(monitor="loss", mode="max", **kwargs)


@pytest.mark.parametrize("every, start, returned", [(1, 0, "epoch 0"), (2, 1, "restored")])
def test_the_weights_fit_returns_are_measured(sqlite_uri, every, start, returned):
    """EarlyStopping(restore_best_weights=True) hands back an earlier epoch's
    weights: returned/<m> is evaluate() of the model fit() returned, at the last
    epoch's step, and the report says which weights it describes."""
    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    model = mlp(bn=True)
    tracker = gaptrack.GapTracker((x, y), batch_size=16, every=every)
    stopper = _stopper(patience=2, start_from_epoch=start, restore_best_weights=True)
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0, callbacks=[stopper, tracker])
    last = len(history.history["loss"]) - 1
    assert last == start + 2  # stopped early
    client = MlflowClient()
    logged, _ = histories(client, tracker.run_id)
    assert max(logged["gap/loss"]) == last  # the last epoch that ran is measured
    final = model.evaluate(x, y, verbose=0, return_dict=True)
    for m in ("loss", "accuracy"):
        assert list(logged[f"returned/{m}"]) == [last]
        assert logged[f"returned/{m}"][last] == pytest.approx(final[m], rel=1e-5)
    assert abs(logged["eval_train/loss"][last] - final["loss"]) > 1e-3  # other weights
    if every == 1:  # the restored weights are epoch 0's, measured then too
        assert logged["eval_train/loss"][0] == pytest.approx(final["loss"], rel=1e-5)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["gaptrack.returned_weights"] == returned
    report = mlflow.artifacts.load_text(f"runs:/{tracker.run_id}/gaptrack/report/report.md")
    assert f"says loss {final['loss']:.4g}" in report
    assert ("weights of epoch 0" if every == 1 else "no measured epoch's") in report


def test_the_last_epoch_that_ran_is_measured_whatever_every(sqlite_uri):
    """EarlyStopping placed after the tracker stops fit when the tracker's
    on_epoch_end has passed: the tracker measures that epoch at train end."""
    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    model = mlp()
    tracker = gaptrack.GapTracker((x, y), batch_size=16, every=3)
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0,
                        callbacks=[tracker, _stopper(patience=2)])
    assert len(history.history["loss"]) == 3
    logged, counts = histories(MlflowClient(), tracker.run_id)
    assert sorted(logged["gap/loss"]) == [0, 2]
    assert counts["fit/loss"] == 3  # fit/* not logged twice
    final = model.evaluate(x, y, verbose=0, return_dict=True)
    assert logged["eval_train/loss"][2] == pytest.approx(final["loss"], rel=1e-5)
    assert "returned/loss" not in logged


@pytest.mark.parametrize("loss", [None, keras.losses.sparse_categorical_crossentropy])
def test_a_model_compiled_without_a_loss_is_measured(sqlite_uri, loss):
    """fit/* logged, the compiled metrics measured, and the loss when given."""
    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    model = OwnLoss(inp, keras.layers.Dense(3, activation="softmax")(h), name="own_loss",
                    own_loss=keras.losses.sparse_categorical_crossentropy)
    model.compile("adam", metrics=["accuracy"])
    tracker = gaptrack.GapTracker((x, y), batch_size=16, loss=loss, bn_snapshots=False)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
    logged, _ = histories(MlflowClient(), tracker.run_id)
    assert [logged["fit/loss"][e] for e in (0, 1)] == history.history["loss"]
    p = model.predict(x, verbose=0)
    assert logged["eval_train/accuracy"][1] == pytest.approx(np.mean(p.argmax(1) == y), rel=1e-6)
    if loss is None:
        assert not any(k.startswith(("eval_train/loss", "gap/loss")) for k in logged)
    else:
        expected = -np.mean(np.log(p[np.arange(len(y)), y]))
        assert logged["eval_train/loss"][1] == pytest.approx(expected, rel=1e-5)
        assert logged["gap/loss"][1] == pytest.approx(
            history.history["loss"][1] - logged["eval_train/loss"][1], abs=1e-9)


def test_a_tracker_given_the_validation_part_too_says_so(sqlite_uri):
    """fit(validation_split=0.2) trains on 160 of 200 samples: 8 steps of 20, not
    the 10 the tracker's 200 samples would make."""
    from gaptrack.probe import ProbeWarning

    x, y = blobs(200)
    with pytest.warns(ProbeWarning, match=r"8 steps per epoch at batch_size=20, i.e. 141 to 160 "
                                          r"samples, but the tracker was given 200.*validation_split"):
        mlp().fit(x, y, batch_size=20, epochs=1, validation_split=0.2, verbose=0,
                  callbacks=[gaptrack.GapTracker((x, y), batch_size=20, bn_snapshots=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeWarning)
        mlp().fit(x, y, batch_size=20, epochs=1, validation_split=0.2, verbose=0,
                  callbacks=[gaptrack.GapTracker((x[:160], y[:160]), batch_size=20,
                                                 bn_snapshots=False)])


def test_own_metric_trackers_are_not_reported_as_measured(sqlite_uri):
    """The lower-level model of Keras' ``compute_loss`` docs lists its own trackers
    as ``metrics``: the tracker cannot feed them, so it reports no number rather
    than their zeros."""

    class OwnTrackers(OwnLoss):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.tracked.update_state(loss)
            return loss

        @property
        def metrics(self):
            return [self.tracked]

    x, y = blobs(64)
    inp = keras.Input((6,))
    model = OwnTrackers(inp, keras.layers.Dense(3, activation="softmax")(inp), name="own",
                        own_loss=keras.losses.sparse_categorical_crossentropy)
    model.tracked = keras.metrics.Mean(name="loss")
    model.compile("adam")
    tracker = gaptrack.GapTracker((x, y), batch_size=16, bn_snapshots=False,
                                  loss=keras.losses.sparse_categorical_crossentropy)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tracker])
    logged, _ = histories(MlflowClient(), tracker.run_id)
    assert logged["fit/loss"][0] == history.history["loss"][0]
    assert not any(k.startswith(("eval_train/", "gap")) for k in logged)


#: Trains with GapTracker(mlflow=False) in a fresh process and prints what it held,
#: with every socket connection the process attempted.
_IN_MEMORY = """
import json, socket, sys
attempts = []
connect = socket.socket.connect
socket.socket.connect = lambda self, address: attempts.append(repr(address)) or connect(
    self, address)
import keras
import gaptrack
from builders import blobs, mlp
keras.utils.set_random_seed(0)
x, y = blobs(128)
model = mlp(bn=True, dropout=0.2)
tracker = gaptrack.GapTracker((x, y), batch_size=32, mlflow=False)
history = model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[tracker])
frame = tracker.to_frame()
print(json.dumps({
    "frame": {key: list(frame[key]) for key in frame.columns}, "index": list(frame.index),
    "history": history.history, "run_id": tracker.run_id,
    "evaluate": model.evaluate(x, y, verbose=0, return_dict=True),
    "report": tracker.report().to_frame().to_dict(orient="index"),
    "diagnosis": tracker.report().diagnosis,
    "mlflow": sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")),
    "attempts": attempts}))
"""


def test_without_mlflow_nothing_is_written_sent_or_imported(tmp_path):
    """GapTracker(mlflow=False): the records in memory, as a frame and a report;
    no run, no spool, no request, no file, and MLflow never imported."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    spool = tmp_path / "spool"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GAPTRACK_SPOOL_DIR": str(spool),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    done = subprocess.run([sys.executable, "-c", _IN_MEMORY], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mlflow"] == [] and out["attempts"] == [] and out["run_id"] is None
    assert not spool.exists() and list(work.iterdir()) == []
    frame, history = out["frame"], out["history"]
    assert out["index"] == [0, 1, 2]
    for m in ("loss", "accuracy"):
        assert frame[f"fit/{m}"] == history[m]
        assert frame[f"eval_train/{m}"][-1] == pytest.approx(out["evaluate"][m], abs=1e-6)
        for f, e, g in zip(frame[f"fit/{m}"], frame[f"eval_train/{m}"], frame[f"gap/{m}"]):
            assert g == f - e
        assert out["report"][m]["gap"] == frame[f"gap/{m}"][-1]
        assert out["report"][m]["bn_ema"] == frame[f"gap/{m}/bn_ema"][-1]
    # the diagnosis: the largest part, unless the gap and its parts are within 1 SE
    loss = out["report"]["loss"]
    within = max(abs(loss[c]) for c in ("gap", *PARTS)) <= loss["noise"]
    assert out["diagnosis"] == ("none" if within else max(PARTS, key=lambda p: abs(loss[p])))


def test_without_mlflow_a_run_id_is_refused():
    with pytest.raises(ValueError, match="GapTracker\\(mlflow=False\\) logs to no run, so "
                                         "run_id='abc' cannot be used"):
        gaptrack.GapTracker(None, mlflow=False, run_id="abc")
