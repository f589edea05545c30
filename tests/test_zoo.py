"""The setups users really have: on each, ``eval_train`` is ``model.evaluate(probe)``,
the decomposition adds up, and measuring changes no state.

Each setup is a small model trained one epoch, measured with
:func:`gaptrack.measure` as the tracker measures it at epoch end, and checked
against ``model.evaluate`` on the same data at its default batch size.
"""

import math

import keras
import numpy as np
import pytest

import gaptrack
from builders import OwnStep, all_state, blobs
from gaptrack.decompose import decompose
from gaptrack.keras_private import class_weight_to_sample_weights

BATCH = 32


def _images(n=96, channels_first=False, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32") + y[:, None, None, None]
    return (np.transpose(x, (0, 3, 1, 2)) if channels_first else x), y


def _sequences(n=96, steps=10, vocab=20, seed=0):
    """Token sequences padded with 0 at the end, of lengths 2 to ``steps``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, size=(n, steps))
    lengths = rng.integers(2, steps + 1, size=n)
    x[np.arange(steps)[None, :] >= lengths[:, None]] = 0
    return x, lengths


def _compile(model, loss="sparse_categorical_crossentropy", **kwargs):
    kwargs.setdefault("metrics", ["accuracy"])
    model.compile(keras.optimizers.Adam(1e-2), loss, **kwargs)
    return model


def conv_bn(channels_first=False):
    x, y = _images(channels_first=channels_first)
    fmt = "channels_first" if channels_first else "channels_last"
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        keras.layers.Conv2D(4, 3, data_format=fmt),
        keras.layers.BatchNormalization(axis=1 if channels_first else -1),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(data_format=fmt),
        keras.layers.Dense(3, activation="softmax"),
    ])
    return _compile(model), (x, y), {}


def dict_inputs():
    x, y = blobs(96)
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3, activation="softmax")(h))
    return _compile(model), ({"a": x[:, :3], "b": x[:, 3:]}, y), {}


def multi_output():
    x, y = blobs(96)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inp)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(inp, {"cls": cls, "reg": reg})
    model = _compile(model, {"cls": "sparse_categorical_crossentropy", "reg": "mse"},
                     loss_weights={"cls": 1.0, "reg": 0.3},
                     metrics={"cls": ["accuracy"], "reg": ["mae"]})
    return model, (x, {"cls": y, "reg": x[:, :1]}), {}


def _mlp(loss="sparse_categorical_crossentropy", **compile_kwargs):
    return _compile(keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                      keras.layers.Dense(3, activation="softmax")]),
                    loss, **compile_kwargs)


def sample_weights():
    x, y = blobs(96)
    sw = np.random.default_rng(1).uniform(0.2, 2.0, size=len(y)).astype("float32")
    return _mlp(), (x, y, sw), {}


def class_weights():
    x, y = blobs(96)
    cw = {0: 1.0, 1: 3.0, 2: 0.5}
    return _mlp(), (x, y, class_weight_to_sample_weights(y, cw)), {"class_weight": cw}


def lstm_mask():
    x, lengths = _sequences()
    y = (lengths > 5).astype("int64")
    model = keras.Sequential([keras.Input((x.shape[1],)),
                              keras.layers.Embedding(20, 4, mask_zero=True),
                              keras.layers.LSTM(6), keras.layers.Dense(2, activation="softmax")])
    return _compile(model), (x, y), {}


def masked_gru():
    """A per-timestep head behind a mask: Keras divides each batch's loss by that
    batch's unmasked count, so the value depends on the batching."""
    x, _ = _sequences()
    y = (x % 3).astype("int64")
    model = keras.Sequential([keras.Input((x.shape[1],)),
                              keras.layers.Embedding(20, 4, mask_zero=True),
                              keras.layers.BatchNormalization(),
                              keras.layers.GRU(6, return_sequences=True),
                              keras.layers.Dense(3, activation="softmax")])
    return _compile(model), (x, y), {}


def layer_group_norm():
    x, y = _images()
    model = keras.Sequential([
        keras.Input(x.shape[1:]), keras.layers.Conv2D(4, 3),
        keras.layers.GroupNormalization(groups=2), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.LayerNormalization(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    return _compile(model), (x, y), {}


def custom_train_step():
    x, y = blobs(96)
    inp = keras.Input((6,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="relu")(inp))
    model = OwnStep(inp, keras.layers.Dense(3, activation="softmax")(h), name="own_step")
    return _compile(model), (x, y), {}


def mixed_float16():
    x, y = blobs(96)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="relu", dtype="mixed_float16"),
        keras.layers.BatchNormalization(dtype="mixed_float16"),
        keras.layers.Dense(3, dtype="mixed_float16"),
        keras.layers.Activation("softmax", dtype="float32"),
    ])
    return _compile(model), (x, y), {}


def steps_per_execution():
    x, y = blobs(96)
    return _mlp(steps_per_execution=2), (x, y), {}


def jit_compile():
    x, y = blobs(96)
    return _mlp(jit_compile=True), (x, y), {}


def augmentation():
    x, y = _images()
    model = keras.Sequential([
        keras.Input(x.shape[1:]), keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomTranslation(0.1, 0.1), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.2),
        keras.layers.Dense(3, activation="softmax"),
    ])
    return _compile(model), (x, y), {}


def validation_data():
    x, y = blobs(96)
    xv, yv = blobs(32, seed=1)
    return _mlp(), (x, y), {"validation_data": (xv, yv)}


def nan_loss():
    x, y = blobs(96)
    x[5, 0] = np.nan
    return _mlp(), (x, y), {}


SETUPS = {
    "conv_bn_nhwc": conv_bn, "conv_bn_channels_first": lambda: conv_bn(channels_first=True),
    "dict_inputs": dict_inputs, "multi_output_loss_weights": multi_output,
    "sample_weights": sample_weights, "class_weights": class_weights, "lstm_mask": lstm_mask,
    "layer_group_norm": layer_group_norm, "custom_train_step": custom_train_step,
    "mixed_float16": mixed_float16, "steps_per_execution": steps_per_execution,
    "jit_compile": jit_compile, "augmentation_layers": augmentation,
    "validation_data": validation_data, "nan_loss": nan_loss, "masked_gru": masked_gru,
}


def _close(a, b):
    if math.isnan(b):
        return math.isnan(a)
    return a == pytest.approx(b, rel=1e-5, abs=1e-7)


def _nchw_convolution_error():
    """Why TensorFlow cannot train a ``channels_first`` convolution on this CPU
    (``None``: it can). Its CPU kernels support NCHW only through oneDNN, which
    TensorFlow turns on for CPUs with AVX-512; elsewhere ``fit()`` itself fails
    ("The Conv2D op currently only supports the NHWC tensor format on the CPU")."""
    import tensorflow as tf

    kernel = tf.Variable(tf.ones((3, 3, 2, 2)))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y = tf.nn.conv2d(x, kernel, 1, "VALID", data_format="NCHW")
        return tape.gradient(y, kernel)

    try:
        step(tf.ones((1, 2, 4, 4)))
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as exc:
        lines = [line.strip() for line in exc.message.splitlines() if line.strip()]
        return next((line for line in lines if "NHWC" in line), lines[-1])
    return None


@pytest.mark.parametrize("name", list(SETUPS))
def test_eval_train_is_evaluate_parts_add_up_and_state_is_untouched(name):
    if name == "conv_bn_channels_first" and keras.backend.backend() == "tensorflow":
        error = _nchw_convolution_error()
        if error:
            pytest.skip(f"TensorFlow cannot train channels_first convolutions on this CPU "
                        f"(no oneDNN): {error}")
    keras.utils.set_random_seed(0)
    model, data, fit_kwargs = SETUPS[name]()
    x, y, *sw = data
    sw = sw[0] if sw else None
    fit_sw = None if "class_weight" in fit_kwargs else sw
    history = model.fit(x, y, sample_weight=fit_sw, batch_size=BATCH, epochs=1, verbose=0,
                        **fit_kwargs)
    fit_logs = {k: v[-1] for k, v in history.history.items() if not k.startswith("val_")}

    before = all_state(model)
    measurement = gaptrack.measure(model, data, batch_size=BATCH)
    after = all_state(model)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))

    evaluated = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    assert set(measurement.eval_train) == set(evaluated)
    for m, value in evaluated.items():
        assert _close(measurement.eval_train[m], value), (m, measurement.eval_train[m], value)

    parts = decompose(fit_logs, measurement.eval_train, measurement.train_mode,
                      measurement.precise_bn)
    assert set(parts) == set(evaluated)
    for m, p in parts.items():
        if math.isfinite(p.gap):
            assert p.drift + p.mode + p.bn_ema == pytest.approx(p.gap, abs=1e-9)
            assert p.gap == pytest.approx(fit_logs[m] - measurement.eval_train[m], abs=1e-9)
