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

    def broken(self, probe):
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
    def broken(self, probe):
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
