"""Labels whose shape broadcasts against the model's output: refused by measure()
and GapTracker before any number, with both shapes and those accepted named;
the shapes Keras pairs correctly still measured, equal to model.evaluate."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

import gaptrack
from gaptrack.labels import LabelShapeError, accepted, aligned, comparison
from gaptrack.probe import ProbeError

N = 32


def two_clusters(n=N, seed=0):
    """The question's data: points near (10, 10) labelled 0 and near (20, 20)
    labelled 1, ``x`` (n, 2), ``y`` (n,) with 20 ones."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, "float32")
    y[rng.permutation(n)[:20]] = 1.0
    x = (10.0 + 10.0 * y[:, None] + rng.normal(size=(n, 2))).astype("float32")
    return x, y


def binary_model(loss="binary_crossentropy", units=1, metrics=("binary_accuracy",)):
    """A model that is right on every point of :func:`two_clusters` from the start
    (Dense(1, sigmoid) on x0 + x1 - 30), so numbers have a known true value."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(units, activation="sigmoid")])
    model.compile("adam", loss, metrics=list(metrics))
    model.layers[0].set_weights([np.full((2, units), 1.0, "float32"),
                                 np.full((units,), -30.0, "float32")])
    return model


def weights(model):
    return [w.copy() for w in model.get_weights()]


# -- the question's shapes: (1, n) labels for (n, 1) outputs ----------------------


def test_the_question_metric_call_is_p2_plus_q2_for_a_perfect_model():
    """What the check is about: Keras' BinaryAccuracy on (1, 32) labels and a
    perfect model's (32, 1) predictions gives p² + (1 - p)², not 1."""
    x, y = two_clusters()
    model = binary_model()
    predictions = model.predict(x, verbose=0)
    assert np.mean((predictions[:, 0] > 0.5) == y) == 1.0  # numpy: the model is perfect
    metric = keras.metrics.BinaryAccuracy()
    metric.update_state(np.expand_dims(y, 0), predictions)
    p = np.mean(y)
    assert float(metric.result()) == pytest.approx(p ** 2 + (1 - p) ** 2) == 0.53125


@pytest.mark.parametrize("data", [
    lambda x, y: (x, np.expand_dims(y, 0)),
    lambda x, y: tf.data.Dataset.from_tensors((x, np.expand_dims(y, 0))),
], ids=["arrays", "dataset"])
def test_question_shapes_are_refused_naming_both_shapes(data):
    x, y = two_clusters()
    model = binary_model()
    message = (r"\[1, 32\] \(x of shape \(32, 2\), y of shape \(1, 32\)\).*one row.*"
               r"shape \(32, 1\).*32 × 32 comparison.*Accepted: y of shape \(32,\) or \(32, 1\)")
    with pytest.raises(ProbeError, match=message):
        gaptrack.measure(model, data(x, y))
    with pytest.raises(ProbeError, match=message):
        gaptrack.GapTracker(data(x, y), batch_size=N)


# -- labels that broadcast into a larger comparison --------------------------------


def test_wider_labels_are_refused_before_any_number(sqlite_uri):
    """(n, 2) labels for a (n, 1) output: Keras' mse and BinaryAccuracy compare
    2n pairs (evaluate() returns numpy's mean over the (n, 2) broadcast); measure()
    and GapTracker refuse them, before training and before any run is created."""
    x, y = two_clusters()
    wide = np.stack([y, 1 - y], axis=1)
    model = binary_model(loss="mse")
    predictions = model.predict(x, verbose=0)
    assert model.evaluate(x, wide, verbose=0)[0] == pytest.approx(
        np.mean((wide - predictions) ** 2), rel=1e-5)  # the (32, 2) broadcast, silently

    message = (r"labels of shape \(32, 2\) against the model's output, of shape \(32, 1\), "
               r"broadcast into a 32 × 2 comparison: 64 label-output pairs for 32 outputs"
               r".*Accepted labels for this output: \(32, 1\) or \(32,\)$")
    with pytest.raises(LabelShapeError, match=message):
        gaptrack.measure(model, (x, wide))
    before = weights(model)
    with pytest.raises(LabelShapeError, match=message):
        model.fit(x, wide, batch_size=8, epochs=1, verbose=0,
                  callbacks=[gaptrack.GapTracker((x, wide), batch_size=8)])
    assert all((a == b).all() for a, b in zip(before, weights(model)))  # no step taken
    assert MlflowClient().search_runs(["0"]) == []  # nothing logged


def test_per_timestep_labels_across_the_time_axis_are_refused():
    """(n, 1, 4) labels for a (n, 4, 1) per-timestep output: 4 × 4 pairs per sample."""
    x = np.random.default_rng(0).normal(size=(N, 4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    with pytest.raises(LabelShapeError, match=r"\(32, 1, 4\) against the model's output, of "
                       r"shape \(32, 4, 1\), broadcast into a 32 × 4 × 4 comparison.*"
                       r"np.reshape\(labels, \(32, 4, 1\)\)"):
        gaptrack.measure(model, (x, np.zeros((N, 1, 4), "float32")))


def test_the_output_is_named_for_a_model_with_several():
    x, y = two_clusters()
    inputs = keras.Input((2,))
    model = keras.Model(inputs, {"p": keras.layers.Dense(1, activation="sigmoid", name="p")(inputs),
                                 "q": keras.layers.Dense(3, name="q")(inputs)})
    model.compile("adam", {"p": "mse", "q": "mse"})
    labels = {"p": np.stack([y, y], axis=1), "q": np.zeros((N, 3), "float32")}
    with pytest.raises(LabelShapeError, match=r"\(32, 2\) against output 'p', of shape \(32, 1\)"):
        gaptrack.measure(model, (x, labels))


# -- shapes Keras pairs correctly: measured as before ---------------------------------


@pytest.mark.parametrize("labels, loss, units, metrics", [
    (lambda y: y, "binary_crossentropy", 1, ["binary_accuracy"]),  # Keras squeezes (n, 1)
    (lambda y: y[:, None], "mse", 1, ["binary_accuracy"]),
    (lambda y: y.astype("int64"), "sparse_categorical_crossentropy", 3, ["accuracy"]),
    (lambda y: y[:, None].astype("int64"), "sparse_categorical_crossentropy", 3, ["accuracy"]),
], ids=["(n,) for (n,1)", "(n,1) for (n,1)", "sparse (n,)", "sparse (n,1)"])
def test_shapes_keras_pairs_correctly_are_measured(labels, loss, units, metrics):
    x, y = two_clusters()
    model = binary_model(loss, units, metrics)
    target = labels(y)
    measured = gaptrack.measure(model, (x, target)).eval_train
    expected = model.evaluate(x, target, batch_size=N, verbose=0, return_dict=True)
    assert measured == pytest.approx(expected, rel=1e-5)
    if units == 1:  # the perfect model: numpy's accuracy
        assert measured["binary_accuracy"] == np.mean(
            (model.predict(x, verbose=0)[:, 0] > 0.5) == y) == 1.0


def test_a_loss_of_ones_own_reads_its_labels_as_it_likes():
    """(n, 2) labels holding a label and a weight, read by the user's loss: not
    refused (no built-in loss compares them with the output)."""
    x, y = two_clusters()

    def weighted_mse(labels, outputs):
        return labels[:, 1] * keras.ops.square(labels[:, 0] - outputs[:, 0])

    model = binary_model(loss=weighted_mse, metrics=())
    packed = np.stack([y, np.linspace(0.5, 2.0, N)], axis=1).astype("float32")
    measured = gaptrack.measure(model, (x, packed)).eval_train["loss"]
    predictions = model.predict(x, verbose=0)[:, 0]
    assert measured == pytest.approx(np.mean(packed[:, 1] * (y - predictions) ** 2), rel=1e-5)


# -- the rule, shape by shape ---------------------------------------------------------


def test_alignment_is_keras_own():
    """``aligned`` gives the shapes Keras' squeeze_or_expand_to_same_rank gives."""
    from keras.src.losses.loss import squeeze_or_expand_to_same_rank

    for labels, outputs in [((8,), (8, 1)), ((8, 1), (8,)), ((8, 1), (8, 3)), ((8, 3, 1), (8, 3)),
                            ((8, 3), (8, 3, 1)), ((1, 8), (8, 1)), ((8,), (8, 4, 1))]:
        expected = squeeze_or_expand_to_same_rank(np.zeros(labels), np.zeros(outputs))
        assert aligned(labels, outputs) == tuple(tuple(np.shape(a)) for a in expected)


def test_comparison_is_larger_only_for_broadcasting_shapes():
    assert comparison((32, 2), (32, 1)) == (32, 2)
    assert comparison((32, 1, 4), (32, 4, 1)) == (32, 4, 4)
    assert comparison((32,), (32, 4, 1)) == (32, 4, 32)
    for output in [(32, 1), (32, 5), (32, 4, 5), (32, 4, 1)]:
        for labels in accepted(output):
            assert comparison(labels, output) is None, (labels, output)
    assert accepted((32, 1)) == [(32, 1), (32,)]
    assert accepted((32, 5)) == [(32, 5), (32,), (32, 1)]
    assert comparison((32, 1), (32, 5)) is None  # class indices: 32 × 5, the output's size
    assert comparison((32, 3), (32, 5)) is None  # not broadcastable: Keras refuses it itself


def test_a_tracked_fit_reads_the_outputs_shapes_once_and_a_recompile_again(sqlite_uri,
                                                                            monkeypatch):
    """The tracker checks the labels before its run starts, the measurement before
    its first number: the second finds the first's answer (the outputs' shapes are
    read once); recompiled, the model is checked again."""
    from gaptrack import keras_private

    traced = []
    original = keras_private.output_shapes
    monkeypatch.setattr(keras_private, "output_shapes",
                        lambda model, x: traced.append(model) or original(model, x))
    x, y = two_clusters()
    model = binary_model()
    tracker = gaptrack.GapTracker((x, y), batch_size=8)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tracker])
    assert traced == [model] and [r.step for r in tracker.records if r.eval_train] == [0, 1]
    model.compile("adam", "mse", metrics=["binary_accuracy"])  # mse takes (n, 2) labels
    with pytest.raises(LabelShapeError, match=r"labels of shape \(32, 2\)"):
        gaptrack.measure(model, (x, np.stack([y, y], axis=1)))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[tracker])
    assert traced == [model] * 3  # the wide labels, then the recompiled model's own
