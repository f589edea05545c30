"""Bad input to the library: one clear error naming the value, before any training
step, and nothing written to the store that a later run would trip over."""

import os
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack.measurement import MeasureError
from gaptrack.probe import ProbeError
from gaptrack.uris import TrackingURIError

x, y = blobs(32)


def unfitted_weights(model):
    return [w.numpy().copy() for w in model.trainable_weights]


@pytest.mark.parametrize("make, error, message", [
    (lambda: gaptrack.GapTracker((x, y), batch_size=0), ValueError,
     "batch_size must be a positive integer, got 0"),
    (lambda: gaptrack.GapTracker((x, y), batch_size=-4), ValueError,
     "batch_size must be a positive integer, got -4"),
    (lambda: gaptrack.GapTracker((x, y), probe_size=0), ProbeError,
     "probe_size must be a positive integer, got 0"),
    (lambda: gaptrack.GapTracker((x, y), probe_size=-3), ProbeError,
     "probe_size must be a positive integer, got -3"),
    (lambda: gaptrack.GapTracker((x, y), every=0), ValueError,
     "every must be a positive integer, got 0"),
    (lambda: gaptrack.GapTracker((x,)), ProbeError, "with targets"),
    (lambda: gaptrack.GapTracker((x, y[:5])), ProbeError, r"different numbers of samples: \[5, 32\]"),
    (lambda: gaptrack.GapTracker(tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()),
     ProbeError, r"infinite tf\.data\.Dataset.*take\("),
    (lambda: gaptrack.GapTracker((x[:0], y[:0])), ProbeError, "empty"),
])
def test_tracker_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_uncompiled_and_lossless_models_are_named(sqlite_uri):
    uncompiled = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(MeasureError, match="'sequential.*' is not compiled; call model.compile"):
        gaptrack.measure(uncompiled, (x, y))
    lossless = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    lossless.compile("adam")  # no loss, no metrics
    with pytest.raises(MeasureError, match="compiled without a loss or metrics, .*loss=fn"):
        gaptrack.measure(lossless, (x, y))
    with pytest.raises(MeasureError, match="loss='mse' is for a model compiled without a loss"):
        gaptrack.measure(mlp(), (x, y), loss="mse")
    with pytest.raises(MeasureError, match="loss must be a function .*, got 3"):
        gaptrack.measure(lossless, (x, y), loss=3)


@pytest.mark.parametrize("uri", ["htp:/x", "not a uri", "http://", "sqlite://"])
def test_malformed_tracking_uri_fails_before_training(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = mlp()
    before = unfitted_weights(model)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(TrackingURIError, match="accepted: http"):
            model.fit(x, y, epochs=1, verbose=0,
                      callbacks=[gaptrack.GapTracker((x, y), batch_size=32)])
    finally:
        mlflow.set_tracking_uri(None)
    assert all((a == b).all() for a, b in zip(before, unfitted_weights(model)))


def test_labels_out_of_range_are_named():
    model = mlp()
    bad = y.copy()
    bad[3] = 7  # the model has 3 classes
    with pytest.raises(Exception, match=r"label value of 7 .*\[0, 3\)"):
        gaptrack.measure(model, (x, bad), batch_size=8)


def test_nan_losses_are_recorded_not_a_crash(sqlite_uri):
    xn = x.copy()
    xn[5, 0] = np.nan
    model = mlp()
    tracker = gaptrack.GapTracker((xn, y), batch_size=8)
    model.fit(xn, y, batch_size=8, epochs=2, verbose=0, callbacks=[tracker])
    run = MlflowClient().get_run(tracker.run_id)
    assert np.isnan(run.data.metrics["fit/loss"]) and np.isnan(run.data.metrics["eval_train/loss"])
    assert run.data.tags["gaptrack.diagnosis"] == "nonfinite"
    assert run.info.status == "FINISHED"


def test_a_backend_gaptrack_does_not_measure_on_is_named():
    """On Keras' numpy backend (inference only) measure() refuses, naming the
    backend and those it measures on."""
    script = (
        "import keras, numpy as np, gaptrack\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        "m.compile('sgd', 'mse')\n"
        "try:\n"
        "    gaptrack.measure(m, (np.zeros((4, 3)), np.zeros((4, 2))))\n"
        "except gaptrack.measurement.MeasureError as e:\n"
        "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, KERAS_BACKEND="numpy"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'numpy' backend" in proc.stdout and "'tensorflow', 'jax', 'torch'" in proc.stdout
