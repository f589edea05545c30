"""The one "never break training" policy: a failure inside the tracker is one
warning naming it, training goes on and the run is tagged; under the test suite
the failure is raised."""

import warnings

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack.measurement import Measurer
from gaptrack.safety import Guard, TrackerWarning

x, y = blobs(64)


def fit_recording(model, tracker, epochs=3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[tracker])
    return history, [str(w.message) for w in caught if issubclass(w.category, TrackerWarning)]


def test_a_failing_measurement_is_one_warning_and_training_goes_on(sqlite_uri, monkeypatch):
    monkeypatch.delenv("GAPTRACK_TESTING")
    calls = []

    def broken(self, probe, weights=None):
        calls.append(1)
        raise RuntimeError("out of memory in the probe pass")

    monkeypatch.setattr(Measurer, "measure", broken)
    keras.utils.set_random_seed(0)
    model = mlp()
    plain = mlp()
    plain.set_weights(model.get_weights())
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    history, failures = fit_recording(model, tracker)
    assert len(calls) == 3  # tried every epoch, warned once
    assert failures == ["gaptrack: measuring epoch 0 failed (RuntimeError: out of memory in the "
                        "probe pass); training goes on"]
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gaptrack.error"] == ("measuring epoch 2: RuntimeError: out of memory "
                                               "in the probe pass")
    logged = {p.step: p.value for p in client.get_metric_history(tracker.run_id, "fit/loss")}
    assert [logged[e] for e in range(3)] == history.history["loss"]
    assert not [k for k in run.data.metrics if k.startswith(("eval_train/", "gap"))]
    # and training was the same as without the tracker
    keras.utils.set_random_seed(0)
    plain_history = plain.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert plain_history.history["loss"] == history.history["loss"]


def test_a_model_without_loss_trains_with_the_tracker_attached(sqlite_uri, monkeypatch):
    monkeypatch.delenv("GAPTRACK_TESTING")
    lossless = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    lossless.compile("adam")  # nothing to measure, nothing for Keras to train on
    before = [w.numpy().copy() for w in lossless.trainable_weights]
    tracker = gaptrack.GapTracker((x, y.astype("float32")[:, None].repeat(3, 1)), batch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="No loss to compute"):  # Keras' own refusal
            lossless.fit(x, y, epochs=1, verbose=0, callbacks=[tracker])
    failures = [str(w.message) for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(failures) == 1 and "compiled without a loss" in failures[0]
    assert all((a == b).all() for a, b in zip(before, lossless.trainable_weights))


def test_under_the_test_suite_failures_are_raised(sqlite_uri, monkeypatch):
    def broken(self, probe, weights=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(Measurer, "measure", broken)
    with pytest.raises(RuntimeError, match="boom"):
        mlp().fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[gaptrack.GapTracker((x, y), batch_size=16)])


def test_guard_warns_once_per_kind_and_keeps_the_last_failure(monkeypatch):
    monkeypatch.delenv("GAPTRACK_TESTING")
    guard = Guard()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            with guard(f"measuring epoch {step}", kind="measuring"):
                raise ValueError(f"bad {step}\nsecond line")
        with guard("the report"):
            pass
        with guard("the report"):
            raise KeyError("x")
    assert [str(w.message) for w in caught] == [
        "gaptrack: measuring epoch 0 failed (ValueError: bad 0); training goes on",
        "gaptrack: the report failed (KeyError: 'x'); training goes on"]
    assert guard.summary == "measuring epoch 2: ValueError: bad 2; the report: KeyError: 'x'"
    assert np.all([w.filename == __file__ for w in caught])


def test_epoch_images_render_off_the_training_thread_and_a_failure_is_one_warning(
        sqlite_uri, monkeypatch):
    """The step images are drawn in the tracker's own thread, all of them before
    the run ends; when drawing fails, that is one warning in the training thread,
    and the epochs' metrics are all logged."""
    import threading

    from gaptrack import stepcharts

    drawn, training = [], threading.current_thread()
    draw = stepcharts.decomposition_png

    def recording(record, names):
        drawn.append((record.step, threading.current_thread()))
        return draw(record, names)

    monkeypatch.setattr(stepcharts, "decomposition_png", recording)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    fit_recording(mlp(bn=True), tracker)
    assert [step for step, _ in drawn] == [0, 1, 2]
    assert all(thread is not training and thread.name.startswith("gaptrack-images")
               for _, thread in drawn)
    client = MlflowClient()
    images = [f.path.split("/")[-1] for f in client.list_artifacts(tracker.run_id, "images")]
    steps = {int(name.split("+")[2]) for name in images
             if name.startswith("gaptrack.decomposition")}
    assert steps == {0, 1, 2}

    monkeypatch.delenv("GAPTRACK_TESTING")

    def broken(record, names):
        raise RuntimeError(f"no font at epoch {record.step}")

    monkeypatch.setattr(stepcharts, "decomposition_png", broken)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    history, failures = fit_recording(mlp(bn=True), tracker)
    assert len(failures) == 1, failures
    assert failures[0].startswith("gaptrack: charting the epoch failed (RuntimeError: no font "
                                  "at epoch ")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert "charting the epoch: RuntimeError: no font" in run.data.tags["gaptrack.error"]
    for key in ("fit/loss", "eval_train/loss", "gap/loss"):
        assert [p.step for p in client.get_metric_history(tracker.run_id, key)] == [0, 1, 2]
    assert client.list_artifacts(tracker.run_id, "images") == []
