"""A Keras 2 (``tf_keras``) model is refused at once, with one error saying what it
is and how to switch, by every entry point that takes a model; a Keras 3 model
beside it is measured as before."""

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import gaptrack
from builders import blobs, mlp
from gaptrack.keras3 import Keras2ModelError

X, Y = blobs(32)


@pytest.fixture(scope="module")
def legacy():
    model = tf_keras.Sequential([tf_keras.layers.Dense(3, activation="softmax",
                                                       input_shape=(6,))])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def assert_refusal(error, where):
    text = str(error.value)
    assert isinstance(error.value, TypeError)
    assert text.startswith(f"{where} was given Sequential")
    for words in ("tf_keras (Keras 2) model", "TF_USE_LEGACY_KERAS", "Keras 3 models (keras>=3",
                  f"here {keras.__version__}", "unset TF_USE_LEGACY_KERAS", "`import keras`"):
        assert words in text


def weights(model):
    return [w.copy() for w in model.get_weights()]


@pytest.mark.parametrize("call, where", [
    (lambda m: gaptrack.measure(m, (X, Y)), "gaptrack.measure()"),
    (lambda m: gaptrack.recalibrate_bn(m, (X, Y)), "gaptrack.recalibrate_bn()"),
    (lambda m: gaptrack.explain(m, (X, Y), batch_size=16), "gaptrack.explain()"),
    (lambda m: m.fit(X, Y, epochs=1, verbose=0, callbacks=[gaptrack.GapTracker((X, Y))]),
     "gaptrack.GapTracker"),
])
def test_a_keras2_model_is_refused(legacy, call, where):
    before = weights(legacy)
    with pytest.raises(Keras2ModelError) as error:
        call(legacy)
    assert_refusal(error, where)
    assert all(np.array_equal(a, b) for a, b in zip(before, legacy.get_weights()))


def test_autolog_refuses_a_keras2_fit_before_it_trains(legacy, sqlite_uri):
    original = tf_keras.Model.fit
    gaptrack.autolog()
    try:
        before = weights(legacy)
        with pytest.raises(Keras2ModelError) as error:
            legacy.fit(X, Y, epochs=1, verbose=0)
        assert_refusal(error, "gaptrack.autolog()")
        assert all(np.array_equal(a, b) for a, b in zip(before, legacy.get_weights()))
        assert mlflow.search_runs(["0"]).empty
    finally:
        gaptrack.autolog(disable=True)
    assert tf_keras.Model.fit is original
    assert len(legacy.fit(X, Y, epochs=1, verbose=0).history["loss"]) == 1


def test_keras3_is_undisturbed_by_tf_keras_beside_it(legacy):
    assert tf.keras.Model is keras.Model  # tf.keras stays Keras 3 without TF_USE_LEGACY_KERAS
    model = mlp()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    measured = gaptrack.measure(model, (X, Y), batch_size=16)
    expected = model.evaluate(X, Y, verbose=0, return_dict=True)
    assert measured.eval_train["loss"] == pytest.approx(expected["loss"], rel=1e-5)
