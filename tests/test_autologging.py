"""gaptrack.autolog(): every fit() tracked, with fit's own training data as probe."""

import re
import warnings

import keras
import mlflow
import numpy as np
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


def shuffled_stream(x, y, batch):
    """A repeated pipeline with a seeded shuffle (its order changes every pass)."""
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=3).repeat().batch(batch)


def test_infinite_pipeline_is_measured_on_one_draw_and_fit_reads_what_it_would(
        sqlite_uri, autologged):
    """fit(dataset.repeat(), steps_per_epoch=4) under autolog: measured on the
    pipeline's first 4 batches, drawn once from a copy (one ProbeWarning), and
    fit trains on the very batches it trains on without gaptrack: the weights
    are bitwise those of a fit without it (a draw from the pipeline itself would
    move the shuffle on by one pass)."""
    x, y = blobs(96)
    runs = {}
    for tracked in (False, True):
        gaptrack.autolog(disable=not tracked)
        keras.utils.set_random_seed(0)
        model, dataset = mlp(), shuffled_stream(x, y, 16)
        with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(dataset, steps_per_epoch=4, epochs=2, verbose=0)
        runs[tracked] = model, history, run.info.run_id, caught
    for a, b in zip(runs[False][0].weights, runs[True][0].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert runs[False][1].history == runs[True][1].history
    ours = [w for w in runs[True][3] if issubclass(w.category, gaptrack.probe.ProbeWarning)]
    assert len(ours) == 1 and "first 4 batches (64 samples)" in str(ours[0].message)
    model, history, run_id, _ = runs[True]
    data = MlflowClient().get_run(run_id).data
    assert data.tags["gaptrack.probe_size"] == "64" and data.tags["gaptrack.batch_size"] == "16"
    assert "one fixed draw" in data.tags["gaptrack.probe_origin"]
    keras.utils.set_random_seed(0)  # the same seeds: a fresh pipeline's first pass
    probe = list(shuffled_stream(x, y, 16).take(4).as_numpy_iterator())
    px, py = np.concatenate([b[0] for b in probe]), np.concatenate([b[1] for b in probe])
    assert len(np.unique(px[:, 0])) == 64
    expected = model.evaluate(px, py, verbose=0, return_dict=True)
    assert data.metrics["eval_train/loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert data.metrics["fit/loss"] == history.history["loss"][-1]

    gaptrack.autolog(probe=shuffled_stream(x, y, 16).take(2))  # a probe given is used
    with mlflow.start_run() as run:
        model.fit(shuffled_stream(x, y, 16), steps_per_epoch=4, epochs=1, verbose=0)
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["gaptrack.probe_size"] == "32" and "gaptrack.probe_origin" not in tags


@pytest.mark.parametrize("setting, error", [("probe_size", ProbeError), ("every", ValueError)])
def test_a_bad_setting_is_refused_by_autolog_not_warned_about_in_fit(autologged, setting,
                                                                     error):
    with pytest.raises(error, match=f"{setting} must be a positive integer, got 0"):
        gaptrack.autolog(**{setting: 0})


def labels_from_an_iterator(x):
    """A pipeline whose map() draws labels from an iterator: no copy of it can
    be read without advancing that iterator for fit too."""
    labels = iter(tf.data.Dataset.range(10**6))
    return tf.data.Dataset.from_tensor_slices(x).map(
        lambda a: (a, labels.get_next() % 3)).repeat().batch(16)


def test_a_pipeline_that_cannot_be_copied_logs_fit_and_leaves_training_alone(
        sqlite_uri, autologged):
    """Not measurable without touching fit's reading: fit/* is logged after one
    ProbeWarning saying why, and training is what it is without gaptrack; the
    same data given to GapTracker by hand is refused at construction."""
    x, _ = blobs(64)
    results = []
    for tracked in (False, True):
        gaptrack.autolog(disable=not tracked)
        keras.utils.set_random_seed(0)
        model = mlp()
        with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(labels_from_an_iterator(x), steps_per_epoch=4, epochs=2,
                                verbose=0)
        results.append((model.get_weights(), history.history, run.info.run_id, caught))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    assert results[0][1] == results[1][1]
    ours = [w for w in results[1][3] if issubclass(w.category, gaptrack.probe.ProbeWarning)]
    assert len(ours) == 1
    assert re.search(r"cannot be copied without sharing state with fit.*logs fit/\* and does "
                     r"not measure.*autolog\(probe=", str(ours[0].message))
    data = MlflowClient().get_run(results[1][2]).data
    assert data.metrics["fit/loss"] == results[1][1]["loss"][-1]
    assert not any(key.startswith(("eval_train/", "gap")) for key in data.metrics)
    assert "gaptrack.error" not in data.tags
    with pytest.raises(ProbeError, match="infinite tf.data.Dataset"):
        gaptrack.GapTracker(labels_from_an_iterator(x))


@pytest.mark.parametrize("as_dataset", [False, True], ids=["arrays", "dataset"])
def test_class_weight_weights_the_measurements_as_fit_does(sqlite_uri, autologged, as_dataset):
    keras.utils.set_random_seed(0)
    x, y = blobs(60)
    class_weight = {0: 1.0, 1: 4.0, 2: 0.25}
    weights = np.array([class_weight[int(c)] for c in y], "float32")
    model = mlp(lr=0.0)  # weights stay as they are: fit/loss is the weighted loss of this model
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(60) if as_dataset else x
    with mlflow.start_run() as run:
        history = model.fit(data, None if as_dataset else y, batch_size=None if as_dataset else 60,
                            epochs=1, class_weight=class_weight, verbose=0)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    weighted = model.evaluate(x, y, sample_weight=weights, verbose=0, return_dict=True)
    plain = model.evaluate(x, y, verbose=0, return_dict=True)
    assert abs(weighted["loss"] - plain["loss"]) > 0.05  # the weighting matters here
    assert metrics["eval_train/loss"] == pytest.approx(weighted["loss"], rel=1e-5)
    assert history.history["loss"][-1] == pytest.approx(weighted["loss"], rel=1e-5)
    assert abs(metrics["gap/loss"]) < 1e-5


class Batches(keras.utils.PyDataset):
    """``(x, y)`` in batches of ``batch_size``, indexable."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]


@pytest.mark.parametrize("probe_size", [None, 40])
def test_fit_on_a_py_dataset_is_measured_on_its_batches(sqlite_uri, autologged, probe_size):
    keras.utils.set_random_seed(0)
    x, y = blobs(100)
    gaptrack.autolog(probe_size=probe_size)
    model = mlp()
    with mlflow.start_run() as run:
        history = model.fit(Batches(x, y, 20), epochs=2, verbose=0)
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.tags["gaptrack.batch_size"] == "20"
    assert data.metrics["fit/loss"] == history.history["loss"][-1]
    if probe_size is None:  # all of it
        expected = model.evaluate(x, y, verbose=0, return_dict=True)
        assert data.tags["gaptrack.probe_size"] == "100"
    else:  # two seeded whole batches, in order
        probe = gaptrack.probe.Probe.from_data(Batches(x, y, 20), probe_size=40)
        rows = np.flatnonzero(np.isin(x[:, 0], probe.x[:, 0]))
        assert len(rows) == 40 and np.array_equal(probe.x, x[rows])
        assert set(rows // 20) == set(np.unique(rows // 20)) and len(set(rows // 20)) == 2
        expected = model.evaluate(x[rows], y[rows], verbose=0, return_dict=True)
    assert data.metrics["eval_train/loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_fit_on_a_generator_logs_fit_and_says_how_to_give_a_probe(sqlite_uri, autologged):
    x, y = blobs(64)

    def batches():
        for _ in range(2):
            for i in range(0, 64, 16):
                yield x[i:i + 16], y[i:i + 16]

    model = mlp()
    with mlflow.start_run() as run, pytest.warns(gaptrack.probe.ProbeWarning) as caught:
        history = model.fit(batches(), steps_per_epoch=4, epochs=2, verbose=0)
    ours = [w for w in caught if issubclass(w.category, gaptrack.probe.ProbeWarning)]
    assert len(ours) == 1 and "gaptrack.autolog(probe=" in str(ours[0].message)
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.metrics["fit/loss"] == history.history["loss"][-1]
    assert not any(key.startswith(("eval_train/", "gap")) for key in data.metrics)
    assert "gaptrack.error" not in data.tags


class EpochWeights(keras.callbacks.Callback):
    """Keeps a copy of the weights at every epoch's end."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def seed_002_pipeline(images, labels, batch):
    """Seed 002's training pipeline, as its user wrote it: each class repeated
    (and shuffled), mixed half and half by sample_from_datasets, batched."""

    def one(label):
        keep = labels == label
        pairs = tf.data.Dataset.from_tensor_slices((images[keep], labels[keep]))
        return pairs.shuffle(int(keep.sum())).repeat()

    return tf.data.Dataset.sample_from_datasets([one(1.0), one(0.0)], weights=[0.5, 0.5]) \
        .batch(batch)


def test_seed_002_oversampled_pipeline_with_early_stopping(server_uri, autologged, tmp_path):
    """The seed's flow on the real server: an oversampled infinite pipeline, a
    small CNN with BN and Dropout, EarlyStopping(restore_best_weights=True),
    ModelCheckpoint and validation data, autolog on. Every epoch is logged with
    eval_train/*, which is evaluate() of that epoch's weights on the drawn probe
    (the pipeline's first steps_per_epoch batches, global seed set); the
    restored weights are logged as returned/*, evaluate() of the model fit()
    returns; the report says the probe is one draw of the pipeline."""
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.15).astype("float32")  # 1 in 7 positive
    images = (rng.normal(size=(200, 8, 8, 1)) + labels[:, None, None, None]).astype("float32")
    keras.utils.set_random_seed(0)
    train = seed_002_pipeline(images, labels, 16)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.3),
        keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    validation = tf.data.Dataset.from_tensor_slices((images[:60], labels[:60])).batch(16)
    # min_delta: no epoch after the first counts as better, so EarlyStopping stops
    # after `patience` more and restores epoch 0's weights, whatever the floats do
    stop = keras.callbacks.EarlyStopping(patience=2, min_delta=1e9, restore_best_weights=True)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True)
    kept = EpochWeights()
    with mlflow.start_run() as run, pytest.warns(gaptrack.probe.ProbeWarning,
                                                 match="one fixed draw"):
        history = model.fit(train, steps_per_epoch=4, epochs=15, validation_data=validation,
                            callbacks=[stop, checkpoint, kept], verbose=0)

    run_id = run.info.run_id
    client = MlflowClient()
    keras.utils.set_random_seed(0)  # the same seeds: a fresh pipeline's first pass
    drawn = list(seed_002_pipeline(images, labels, 16).take(4).as_numpy_iterator())
    px, py = np.concatenate([b[0] for b in drawn]), np.concatenate([b[1] for b in drawn])
    assert 0.3 < py.mean() < 0.7  # oversampled
    epochs = len(history.history["loss"])
    assert epochs == 3 and len(kept.weights) == 3
    returned = model.get_weights()
    for step, weights in enumerate(kept.weights):
        model.set_weights(weights)
        expected = model.evaluate(px, py, verbose=0, return_dict=True)
        for m in ("loss", "accuracy"):
            points = {p.step: p.value for p in client.get_metric_history(run_id, f"eval_train/{m}")}
            assert points[step] == pytest.approx(expected[m], abs=1e-6)
    for key in ("fit/loss", "val/loss", "gap/loss"):
        assert [p.step for p in client.get_metric_history(run_id, key)] == [0, 1, 2]
    model.set_weights(returned)
    for a, b in zip(returned, kept.weights[0]):
        np.testing.assert_array_equal(a, b)  # EarlyStopping restored epoch 0
    best = int(np.argmin(history.history["val_loss"]))  # ModelCheckpoint's own best
    saved = keras.saving.load_model(tmp_path / "best.keras").get_weights()
    for a, b in zip(saved, kept.weights[best]):
        np.testing.assert_array_equal(a, b)
    data = client.get_run(run_id).data
    final = model.evaluate(px, py, verbose=0, return_dict=True)
    assert data.metrics["returned/loss"] == pytest.approx(final["loss"], abs=1e-6)
    assert data.metrics["returned/accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert data.tags["gaptrack.returned_weights"] == "epoch 0"
    assert data.tags["gaptrack.probe_size"] == "64"
    report = mlflow.artifacts.load_text(f"runs:/{run_id}/gaptrack/report/report.md")
    assert ("is one fixed draw of the training pipeline, its first 4 batches (64 samples)"
            in report) and "samples at random" in report
    assert "returned holds the weights of epoch 0" in report
