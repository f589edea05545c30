"""Tests of gaptrack.bn: finding BN layers, their MLflow keys, staleness, and the
moments recorded while a model runs.

Layers found are compared by object with the layers the test built; keys are
checked with MLflow's own validator; staleness against numpy by hand; recorded
moments against numpy moments of the BN layer's input obtained from a separate
functional sub-model.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from mlflow.utils.validation import _validate_metric_name

from gaptrack.keys import STALENESS_STATS, staleness_key
from gaptrack.bn import BNStatistics, find_bn_layers, staleness, watch_inputs


def ids(found):
    return [id(bn.layer) for bn in found]


def block(name="block"):
    """A nested functional model; every copy has the same layer names."""
    i = keras.Input((4,))
    h = layers.Dense(4, name="dense")(i)
    h = layers.BatchNormalization(name="bn")(h)
    return keras.Model(i, h, name=name)


# -- find_bn_layers ------------------------------------------------------------------


def test_sequential():
    bn = layers.BatchNormalization(name="bn")
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2), bn, layers.Dense(1)])
    found = find_bn_layers(model)
    assert len(found) == 1 and found[0].layer is bn
    assert (found[0].path, found[0].key) == ("bn", "bn")


def test_functional_with_nested_sequential():
    inner_bn = layers.BatchNormalization(name="inner_bn")
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4), inner_bn], name="inner")
    head_bn = layers.BatchNormalization(name="head_bn")
    i = keras.Input((3,))
    h = layers.Dense(4)(i)
    model = keras.Model(i, head_bn(inner(h)))
    found = find_bn_layers(model)
    assert ids(found) == [id(inner_bn), id(head_bn)]
    assert [bn.path for bn in found] == ["inner/inner_bn", "head_bn"]


def test_two_copies_of_a_nested_model_get_unique_stable_paths():
    a, b = block(), block()  # same model name, same layer names
    assert a.name == b.name and a.layers[-1].name == b.layers[-1].name

    class Twin(keras.Model):
        def __init__(self):
            super().__init__(name="twin")
            self.a, self.b = a, b

        def call(self, x):
            return self.a(x) + self.b(x)

    model = Twin()
    model(np.zeros((2, 4), "float32"))
    found = find_bn_layers(model)
    assert ids(found) == [id(a.layers[-1]), id(b.layers[-1])]
    assert [bn.path for bn in found] == ["block/bn", "block:2/bn"]
    assert len({bn.key for bn in found}) == 2
    again = find_bn_layers(model)
    assert [(bn.path, bn.key) for bn in again] == [(bn.path, bn.key) for bn in found]
    assert ids(again) == ids(found)


def test_two_copies_in_a_functional_model():
    # Keras wants unique names among a functional model's own layers; the nested
    # copies' layers still share names.
    a, b = block("features"), block("features_2")
    i = keras.Input((4,))
    model = keras.Model(i, layers.Add()([a(i), b(i)]))
    found = find_bn_layers(model)
    assert ids(found) == [id(a.layers[-1]), id(b.layers[-1])]
    assert [bn.path for bn in found] == ["features/bn", "features_2/bn"]
    assert len({bn.key for bn in found}) == 2


def test_a_shared_nested_model_is_listed_once():
    shared = block("shared")
    i1, i2 = keras.Input((4,)), keras.Input((4,))
    model = keras.Model([i1, i2], layers.Concatenate()([shared(i1), shared(i2)]))
    found = find_bn_layers(model)
    assert ids(found) == [id(shared.layers[-1])]
    assert found[0].path == "shared/bn"


def test_subclassed_model_with_attributes_and_a_custom_layer():
    class Block(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(3)
            self.norm = layers.BatchNormalization(name="block_bn")

        def call(self, x, training=None):
            return self.norm(self.dense(x), training=training)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.first = layers.BatchNormalization(name="first_bn")
            self.block = Block(name="custom")
            self.ln = layers.LayerNormalization()

        def call(self, x, training=None):
            return self.ln(self.block(self.first(x, training=training), training=training))

    model = Net()
    model(np.zeros((2, 3), "float32"))
    found = find_bn_layers(model)
    assert ids(found) == [id(model.first), id(model.block.norm)]
    assert [bn.path for bn in found] == ["first_bn", "custom/block_bn"]


def test_synchronized_and_frozen_bn_are_found_other_normalisations_are_not():
    sync = layers.BatchNormalization(synchronized=True, name="sync")
    frozen = layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    model = keras.Sequential([
        keras.Input((4,)), sync, layers.LayerNormalization(name="ln"),
        layers.GroupNormalization(groups=2, name="gn"), frozen,
        layers.UnitNormalization(name="un"),
    ])
    assert ids(find_bn_layers(model)) == [id(sync), id(frozen)]


def test_a_model_without_bn():
    model = keras.Sequential([keras.Input((2,)), layers.Dense(1)])
    assert find_bn_layers(model) == []


# -- keys ----------------------------------------------------------------------------


NAMES = ["bn#1", "bn_1", "a..b", "with space", ".", "..", "é", "bn_1:2", "x%y?z"]


def test_keys_are_valid_unique_mlflow_keys():
    model = keras.Sequential(
        [keras.Input((2,))] + [layers.BatchNormalization(name=n) for n in NAMES])
    found = find_bn_layers(model)
    assert [bn.path for bn in found] == NAMES
    keys = [bn.key for bn in found]
    assert len(set(keys)) == len(keys), keys
    for key in keys:
        for stat in STALENESS_STATS:
            _validate_metric_name(staleness_key(stat, key))
    # A name MLflow accepts and no other key collides with is kept (spaces are allowed).
    assert keys[NAMES.index("with space")] == "with space"


def test_validator_rejects_the_raw_names():
    # The test above would be empty if MLflow accepted these names as they are.
    for bad in ("bn#1", "x%y?z", "."):
        with pytest.raises(Exception):
            _validate_metric_name(staleness_key("mean", bad))


def test_nested_paths_make_valid_keys():
    a, b = block("a..b"), block("a..b")

    class Twin(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def call(self, x):
            return self.a(x) + self.b(x)

    model = Twin()
    model(np.zeros((1, 4), "float32"))
    keys = [bn.key for bn in find_bn_layers(model)]
    assert len(set(keys)) == 2
    for key in keys:
        _validate_metric_name(staleness_key("mean", key))


# -- staleness -----------------------------------------------------------------------


def test_staleness_by_hand():
    moving_mean = [0.0, 1.0, -2.0]
    moving_var = [1.0, 8.0, 0.5]
    mean = [2.0, 1.0, -1.0]
    var = [4.0, 2.0, 0.5]
    eps = 1e-3
    mean_lag = sum(abs(mm - m) / math.sqrt(v + eps)
                   for mm, m, v in zip(moving_mean, mean, var)) / 3
    var_lag = sum(abs(math.log((mv + eps) / (v + eps))) for mv, v in zip(moving_var, var)) / 3
    got = staleness(moving_mean, moving_var, mean, var, eps)
    assert got == pytest.approx((mean_lag, var_lag), rel=1e-12)


def test_staleness_meaning():
    # Moving mean 2 standard deviations off, moving variance 4 times too large.
    assert staleness([3.0], [16.0], [1.0], [4.0], 0.0) == pytest.approx((1.0, math.log(4)))
    assert staleness([1.0, 2.0], [4.0, 5.0], [1.0, 2.0], [4.0, 5.0], 1e-3) == (0.0, 0.0)


def test_staleness_is_scale_free():
    rng = np.random.default_rng(0)
    mm, m = rng.normal(size=(2, 16))
    mv, v = rng.uniform(0.5, 2.0, size=(2, 16))
    base = staleness(mm, mv, m, v, 1e-12)
    for c in (10.0, 0.1, 1e3):  # epsilon stays negligible against c**2 * var
        scaled = staleness(mm * c, mv * c**2, m * c, v * c**2, 1e-12)
        np.testing.assert_allclose(scaled, base, rtol=1e-9)


def test_staleness_of_a_real_layer_is_scale_free():
    """Train a BN layer on x and on 10 x: its moving statistics and the population
    statistics of its input scale together, so the lags are the same."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(64, 5)).astype("float32")
    lags = []
    for c in (1.0, 10.0):
        # The initial moving statistics (0 and 1) scale too.
        bn = layers.BatchNormalization(
            momentum=0.5, epsilon=1e-12,
            moving_variance_initializer=keras.initializers.Constant(c**2))
        for batch in np.split(c * x, 4):
            bn(batch, training=True)
        mean = np.mean([b.mean(axis=0) for b in np.split(c * x, 4)], axis=0)
        var = np.mean([b.var(axis=0) for b in np.split(c * x, 4)], axis=0)
        stats = BNStatistics(
            path="bn", key="bn", trains=True,
            moving_mean=bn.moving_mean.numpy(), moving_variance=bn.moving_variance.numpy(),
            mean=mean, variance=var, gamma=None, beta=None, epsilon=bn.epsilon)
        assert stats.staleness == staleness(stats.moving_mean, stats.moving_variance, mean, var, 1e-12)
        lags.append(stats.staleness)
    assert lags[0][0] > 0.05 and lags[0][1] > 0.05  # the moving statistics do lag
    np.testing.assert_allclose(lags[1], lags[0], rtol=1e-5)


# -- watch_inputs --------------------------------------------------------------------


def recorded(model, found, x, training=True):
    """Run ``model`` inside a tf.function under ``watch_inputs``; return the record
    (as numpy, keyed by layer id) and the model's output."""

    @tf.function
    def run(x):
        with watch_inputs(found) as record:
            y = model(x, training=training)
        return y, dict(record)

    y, record = run(tf.constant(x))
    return {k: tuple(np.asarray(t) for t in v) for k, v in record.items()}, np.asarray(y)


def assert_moments(record, layer, layer_input):
    trains, mean, var, n = record[id(layer)]
    axes = tuple(range(layer_input.ndim - 1))
    x64 = np.asarray(layer_input, np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-4, atol=1e-6)
    assert n == layer_input.shape[0]
    return bool(trains)


def test_watch_inputs_records_the_moments_of_the_layer_input():
    i = keras.Input((5,))
    h = layers.Dense(4, name="d1")(i)
    h = layers.BatchNormalization(name="bn_a")(h)
    h = layers.Dense(3, name="d2")(h)
    frozen = layers.BatchNormalization(name="bn_frozen")
    frozen.trainable = False
    h = frozen(h)
    model = keras.Model(i, layers.Dense(2)(h))
    found = find_bn_layers(model)
    x = np.random.default_rng(2).normal(2.0, 3.0, size=(16, 5)).astype("float32")
    expected_y = np.asarray(model(x, training=True))

    record, y = recorded(model, found, x)
    assert set(record) == set(ids(found))
    trains = {}
    for bn in found:
        layer_input = keras.Model(model.input, bn.layer.input)(x, training=True)
        trains[bn.path] = assert_moments(record, bn.layer, np.asarray(layer_input))
    assert trains == {"bn_a": True, "bn_frozen": False}
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)  # same computation
    for bn in found:
        assert "call" not in vars(bn.layer)
        assert bn.layer.call.__func__ is layers.BatchNormalization.call


def test_watch_inputs_per_channel_for_convolutions():
    i = keras.Input((4, 4, 2))
    h = layers.Conv2D(3, 1, name="conv")(i)
    bn = layers.BatchNormalization(name="bn")
    model = keras.Model(i, bn(h))
    x = np.random.default_rng(3).normal(1.0, 2.0, size=(6, 4, 4, 2)).astype("float32")
    record, _ = recorded(model, find_bn_layers(model), x)
    layer_input = np.asarray(keras.Model(i, h)(x))
    assert record[id(bn)][1].shape == (3,)
    assert assert_moments(record, bn, layer_input)


def test_inference_mode_call_does_not_train():
    model = keras.Sequential([keras.Input((3,)), layers.BatchNormalization()])
    x = np.random.default_rng(4).normal(size=(8, 3)).astype("float32")
    record, _ = recorded(model, find_bn_layers(model), x, training=False)
    assert assert_moments(record, model.layers[0], x) is False


def test_nested_model_called_with_training_false_in_a_subclassed_model():
    inner_bn = layers.BatchNormalization(name="inner_bn")
    i = keras.Input((3,))
    inner = keras.Model(i, inner_bn(i), name="inner")

    class Outer(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = inner
            self.bn = layers.BatchNormalization(name="outer_bn")

        def call(self, x, training=None):
            return self.bn(self.inner(x, training=False), training=training)

    model = Outer()
    x = np.random.default_rng(5).normal(size=(8, 3)).astype("float32")
    model(x)
    record, _ = recorded(model, find_bn_layers(model), x)
    assert assert_moments(record, inner_bn, x) is False
    assert assert_moments(record, model.bn, np.asarray(inner(x, training=False))) is True


def bn_used_batch_statistics(model, bn, x):
    """Independent check: with momentum 0 a training-mode BN copies the batch mean
    into ``moving_mean``; a layer in inference mode leaves it alone."""
    before = bn.moving_mean.numpy().copy()
    bn.moving_mean.assign(np.full_like(before, -1e3))
    model(x, training=True)
    changed = not np.allclose(bn.moving_mean.numpy(), -1e3)
    bn.moving_mean.assign(before)
    return changed


def test_trains_flag_follows_what_keras_does_in_a_functional_model():
    # `base(x, training=False)` inside a functional model: whether the nested BN
    # uses batch statistics when the outer model trains depends on Keras' rules,
    # so the flag is compared with what the layer actually does.
    inner_bn = layers.BatchNormalization(momentum=0.0, name="inner_bn")
    i = keras.Input((3,))
    inner = keras.Model(i, inner_bn(i), name="inner")
    o = keras.Input((3,))
    model = keras.Model(o, inner(o, training=False))
    x = np.random.default_rng(6).normal(5.0, 1.0, size=(8, 3)).astype("float32")
    record, _ = recorded(model, find_bn_layers(model), x)
    assert assert_moments(record, inner_bn, x) is bn_used_batch_statistics(model, inner_bn, x)

    frozen = layers.BatchNormalization(momentum=0.0)
    frozen.trainable = False
    seq = keras.Sequential([keras.Input((3,)), frozen])
    record, _ = recorded(seq, find_bn_layers(seq), x)
    assert assert_moments(record, frozen, x) is bn_used_batch_statistics(seq, frozen, x) is False


def test_call_is_restored_after_an_error():
    model = keras.Sequential([keras.Input((3,)), layers.BatchNormalization()])
    found = find_bn_layers(model)
    with pytest.raises(RuntimeError):
        with watch_inputs(found):
            assert "call" in vars(found[0].layer)
            raise RuntimeError("boom")
    assert "call" not in vars(found[0].layer)
