"""gaptrack.autolog(): every fit() tracked, with fit's own training data as probe."""

import keras
import mlflow
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack.probe import ProbeError


@pytest.fixture
def autologged():
    original = keras.Model.fit
    gaptrack.autolog()
    yield
    gaptrack.autolog(disable=True)
    assert keras.Model.fit is original


def test_fit_is_tracked_on_its_training_part(sqlite_uri, autologged):
    keras.utils.set_random_seed(0)
    x, y = blobs(100)
    model = mlp()
    with mlflow.start_run() as run:
        history = model.fit(x, y, batch_size=20, epochs=2, validation_split=0.2, verbose=0)
    data = MlflowClient().get_run(run.info.run_id).data
    # Keras trains on the first 80 samples: that is the probe, at fit's batch size
    assert data.tags["gaptrack.probe_size"] == "80"
    assert data.tags["gaptrack.batch_size"] == "20"
    assert data.metrics["fit/loss"] == history.history["loss"][-1]
    assert data.metrics["val/loss"] == history.history["val_loss"][-1]
    expected = model.evaluate(x[:80], y[:80], verbose=0, return_dict=True)
    assert data.metrics["eval_train/loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_default_batch_size_and_datasets(sqlite_uri, autologged):
    x, y = blobs(64)
    model = mlp()
    with mlflow.start_run() as run:
        model.fit(x, y, epochs=1, verbose=0)
    assert MlflowClient().get_run(run.info.run_id).data.tags["gaptrack.batch_size"] == "32"
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with mlflow.start_run() as run:
        model.fit(dataset, epochs=1, verbose=0)
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["gaptrack.batch_size"] == "16" and tags["gaptrack.probe_size"] == "64"


def test_an_explicit_tracker_is_not_doubled(sqlite_uri, autologged):
    x, y = blobs(32)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    mlp().fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
    points = MlflowClient().get_metric_history(tracker.run_id, "gap/loss")
    assert [p.step for p in points] == [0, 1]


def test_infinite_dataset_needs_a_probe(sqlite_uri, autologged):
    x, y = blobs(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    model = mlp()
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(ProbeError, match=r"infinite.*steps_per_epoch=4.*autolog\(probe="):
        model.fit(dataset, steps_per_epoch=4, epochs=1, verbose=0)
    assert all((a == b.numpy()).all() for a, b in zip(before, model.trainable_variables))
    gaptrack.autolog(probe=dataset.take(2))
    with mlflow.start_run() as run:
        model.fit(dataset, steps_per_epoch=4, epochs=1, verbose=0)
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["gaptrack.probe_size"] == "32" and tags["gaptrack.batch_size"] == "16"
