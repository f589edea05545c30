"""measure(): eval_train, train_mode and precise_bn against independent computations."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import gaptrack
from builders import all_state, blobs, mlp
from gaptrack.measurement import MeasureError, Measurer
from gaptrack.probe import Probe


def assert_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


class Accuracy2(keras.metrics.Metric):
    """A custom metric: fraction of samples whose true class has p > 0.5."""

    def __init__(self, name="confident", **kwargs):
        super().__init__(name=name, **kwargs)
        self.hits = self.add_variable((), initializer="zeros", name="hits")
        self.count = self.add_variable((), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        classes = ops.reshape(ops.cast(y_true, "int32"), (-1, 1))
        p = ops.reshape(ops.take_along_axis(y_pred, classes, axis=1), (-1,))
        w = ops.ones_like(p) if sample_weight is None else ops.cast(sample_weight, p.dtype)
        self.hits.assign_add(ops.sum(w * ops.cast(p > 0.5, p.dtype)))
        self.count.assign_add(ops.sum(w))

    def result(self):
        return self.hits / self.count


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu",
                                         kernel_regularizer=keras.regularizers.l2(0.01))
        self.bn = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.3)
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, x, training=False):
        h = self.drop(self.bn(self.hidden(x), training=training), training=training)
        self.add_loss(0.001 * ops.mean(ops.square(h)))
        return self.out(h)


def two_headed():
    inp = keras.Input((6,), name="x")
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.BatchNormalization()(h)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(keras.layers.Dropout(0.2)(h))
    model = keras.Model(inp, {"cls": cls, "reg": reg})
    model.compile("adam", loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
                  loss_weights={"cls": 1.0, "reg": 0.5},
                  metrics={"cls": ["accuracy"], "reg": ["mae"]})
    return model


@pytest.mark.parametrize("kind", ["sequential", "functional_multi_output", "subclassed",
                                  "sample_weight", "tf_data"])
def test_eval_train_equals_model_evaluate(kind):
    keras.utils.set_random_seed(0)
    x, y = blobs(200)
    sw = np.linspace(0.2, 2.0, len(x)).astype("float32")
    if kind == "functional_multi_output":
        model = two_headed()
        targets = {"cls": y, "reg": x[:, :1] * 2.0}
        data = (x, targets)
    elif kind == "subclassed":
        model = Subclassed()
        model.compile("adam", "sparse_categorical_crossentropy",
                      metrics=["accuracy", Accuracy2()])
        data = (x, y)
    else:
        model = mlp(bn=True, dropout=0.3, l2=0.01, activity=0.001,
                    metrics=("accuracy", Accuracy2()))
        data = (x, y, sw) if kind == "sample_weight" else (x, y)
    arrays = dict(zip(("x", "y", "sample_weight"), data))
    model.fit(**arrays, batch_size=32, epochs=2, verbose=0)
    if kind == "tf_data":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        expected = model.evaluate(data, verbose=0, return_dict=True)
    else:
        expected = model.evaluate(**arrays, batch_size=32, verbose=0, return_dict=True)
    m = gaptrack.measure(model, data, batch_size=32)
    assert_close(m.eval_train, expected)
    assert m.train_mode.keys() == expected.keys()
    assert m.probe_size == len(x)


@pytest.mark.parametrize("chunk_batches", [None, 1, 2])
def test_train_mode_equals_training_forward_of_a_clone(chunk_batches, monkeypatch):
    """No Dropout, so training mode is deterministic: the clone's training-mode
    forward, batch by batch, gives the loss and accuracy by hand (numpy). Run in
    one call (the default for so few samples), or split into calls of one or two
    training batches, as a larger probe is; 150 = 3 * 40 + 30."""
    if chunk_batches:
        per_call = chunk_batches * 40 * 6 * 4  # batches of 40 samples of 6 float32
        monkeypatch.setattr(gaptrack.measurement, "_TRAIN_CHUNK_BYTES", per_call)
    keras.utils.set_random_seed(1)
    x, y = blobs(150)
    chunk = Measurer(mlp(), 40)._train_chunk_size(Probe.from_data((x, y)))
    assert chunk == 40 * (chunk_batches or 256)
    model = mlp(bn=True, l2=0.01)
    model.fit(x, y, batch_size=25, epochs=2, verbose=0)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    losses, hits, sizes = [], 0.0, []
    for start in range(0, len(x), 40):
        xb, yb = x[start:start + 40], y[start:start + 40]
        p = ops.convert_to_numpy(clone(xb, training=True)).astype(np.float64)
        ce = -np.log(np.clip(p[np.arange(len(yb)), yb], 1e-7, 1.0))
        reg = sum(0.01 * np.sum(np.square(w.numpy().astype(np.float64)))
                  for w in clone.trainable_weights if w.path.endswith("kernel")
                  and w.regularizer is not None)
        losses.append(ce.mean() + reg)
        sizes.append(len(yb))
        hits += np.sum(p.argmax(1) == yb)
    expected_loss = np.average(losses, weights=sizes)
    m = gaptrack.measure(model, (x, y), batch_size=40)
    np.testing.assert_allclose(m.train_mode["loss"], expected_loss, rtol=1e-5)
    assert m.train_mode["accuracy"] == pytest.approx(hits / len(x), abs=1e-7)
    # and training mode differs from inference mode (BN batch statistics)
    assert abs(m.train_mode["loss"] - m.eval_train["loss"]) > 1e-4


def test_train_mode_is_the_same_however_the_pass_is_split(monkeypatch):
    """With Dropout, the seed state runs from batch to batch across the calls of
    the training-mode pass: one call, or calls of one or two batches, draw the
    same masks and so give the same values and population statistics."""
    keras.utils.set_random_seed(6)
    x, y = blobs(150)
    model = mlp(bn=True, dropout=0.5)
    model.fit(x, y, batch_size=40, epochs=1, verbose=0)
    results = []
    for chunk_batches in (None, 1, 2):
        if chunk_batches:
            monkeypatch.setattr(gaptrack.measurement, "_TRAIN_CHUNK_BYTES",
                                chunk_batches * 40 * 6 * 4)
            assert Measurer(model, 40)._train_chunk_size(Probe.from_data((x, y))) \
                == 40 * chunk_batches
        results.append(gaptrack.measure(model, (x, y), batch_size=40, seed=3))
    whole, *split = results
    other_seed = gaptrack.measure(model, (x, y), batch_size=40, seed=4)
    assert whole.train_mode["loss"] != other_seed.train_mode["loss"]  # masks matter
    for m in split:
        assert_close(m.train_mode, whole.train_mode, rtol=1e-6)
        for a, b in zip(m.bn, whole.bn):
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(a.variance, b.variance, rtol=1e-6, atol=1e-7)


def test_measure_changes_no_state_and_dropout_is_seeded():
    keras.utils.set_random_seed(2)
    x, y = blobs(120)
    model = mlp(bn=True, dropout=0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = all_state(model)
    names = [v.path for v in model.variables]
    assert any("seed_generator" in n for n in names)  # Dropout's seed state is checked
    assert any("moving_mean" in n for n in names)
    a = gaptrack.measure(model, (x, y), batch_size=16, seed=7)
    after = all_state(model)
    assert len(before) == len(after)
    for b, c in zip(before, after):
        assert b.dtype == c.dtype and b.tobytes() == c.tobytes()
    b = gaptrack.measure(model, (x, y), batch_size=16, seed=7)
    c = gaptrack.measure(model, (x, y), batch_size=16, seed=8)
    assert a.train_mode == b.train_mode
    assert a.train_mode["loss"] != c.train_mode["loss"]
    assert a.eval_train == c.eval_train  # inference mode does not depend on the seed


def test_passes_are_traced_once_per_model_and_released_with_it():
    """Ten measure() calls, a probe of another size (other partial batches) and
    recalibrate_bn share one trace of each pass (on JAX, one per batch shape); the
    passes go with the model."""
    keras.utils.set_random_seed(5)
    x, y = blobs(100)
    model = mlp(bn=True, dropout=0.2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    expected = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    first = gaptrack.measure(model, (x, y), batch_size=16, inference_batch_size=48)
    for _ in range(9):  # 100 samples: 6 training batches of 16 and one of 4; 48, 48, 4
        m = gaptrack.measure(model, (x, y), batch_size=16, inference_batch_size=48)
        assert_close(m.eval_train, expected)
        assert m.train_mode == first.train_mode and m.precise_bn == first.precise_bn
    gaptrack.measure(model, (x[:77], y[:77]), batch_size=16, inference_batch_size=48)
    gaptrack.recalibrate_bn(model, (x, y), batch_size=16)
    passes = Measurer(model, 16)._compiled(Probe.from_data((x, y)))
    if keras.backend.backend() == "tensorflow":  # one trace for every batch size
        assert passes.traces == {"train": 1, "infer": 1}
        # and the inference forward, called twice by the inference step (with the
        # moving and with the population statistics), is traced once
        (_, _, forward), = passes._runner._functions.values()
        assert forward.experimental_get_tracing_count() == 1
    elif keras.backend.backend() == "jax":
        # training: one scan per number of whole batches in a chunk, 6 (100 = 6 * 16
        # + 4) and 4 (77 = 4 * 16 + 13), one step per partial batch, 4 and 13;
        # inference: one per batch shape, 48, 4 (100 = 2 * 48 + 4) and 29 (77 = 48 + 29)
        assert passes.traces == {"train": 4, "infer": 3}
    else:  # PyTorch runs eagerly
        assert passes.traces is None
    alive = weakref.ref(model)
    del model, passes
    gc.collect()
    assert alive() is None


def _bn_inputs_in_training_mode(model, x, batch_size):
    """Each BN layer's input, batch by batch, from functional sub-models."""
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    subs = [keras.Model(model.inputs, l.input) for l in bns]
    per_layer = []
    for sub in subs:
        per_layer.append([ops.convert_to_numpy(sub(x[s:s + batch_size], training=True))
                          .astype(np.float64)
                          for s in range(0, len(x), batch_size)])
    return bns, per_layer


def _population(batches):
    """PreciseBN's population statistics, in numpy: the batches' means and (biased,
    as Keras') variances, averaged weighted by the batches' sizes."""
    batches = [np.asarray(b, dtype=np.float64) for b in batches]
    n = np.array([len(b) for b in batches], dtype=np.float64)[:, None]
    return ((n * np.stack([b.mean(axis=0) for b in batches])).sum(0) / n.sum(),
            (n * np.stack([b.var(axis=0) for b in batches])).sum(0) / n.sum())


def test_precise_bn_statistics_equal_numpy_on_layer_inputs():
    keras.utils.set_random_seed(3)
    x, y = blobs(130)
    model = mlp(bn=True, depth=3)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    bns, inputs = _bn_inputs_in_training_mode(model, x, 30)
    m = gaptrack.measure(model, (x, y), batch_size=30)
    assert [s.path for s in m.bn] == [l.name for l in bns]
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    for stats, layer_inputs, clone_bn in zip(
            m.bn, inputs, [l for l in clone.layers
                           if isinstance(l, keras.layers.BatchNormalization)]):
        mean, var = _population(layer_inputs)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-5, atol=1e-6)
        assert stats.trains
        clone_bn.moving_mean.assign(mean.astype("float32"))
        clone_bn.moving_variance.assign(var.astype("float32"))
    # precise_bn equals evaluate() of a clone given the numpy statistics
    expected = clone.evaluate(x, y, verbose=0, return_dict=True)
    assert_close(m.precise_bn, expected, rtol=1e-5)


class OffPath(keras.Model):
    """BN layers of 6, 4 and 16 channels; the 4-channel one is not on the forward path."""

    def __init__(self):
        super().__init__()
        self.bn_in = keras.layers.BatchNormalization()
        self.unused = keras.layers.BatchNormalization()
        self.unused.build((None, 4))
        self.hidden = keras.layers.Dense(16, activation="elu")
        self.bn = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, x, training=False):
        h = self.hidden(self.bn_in(x, training=training))
        return self.out(self.bn(h, training=training))


def test_population_statistics_of_layers_of_other_widths_and_off_the_path():
    """Each layer's statistics from its own channels, whatever the widths of the
    others; a BN layer the forward pass does not call has none and does not train."""
    keras.utils.set_random_seed(7)
    x, y = blobs(100)
    model = OffPath()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=25, epochs=1, verbose=0)
    m = gaptrack.measure(model, (x, y), batch_size=30)
    by_layer = {id(layer): stats for layer, stats in
                zip((model.bn_in, model.unused, model.bn), m.bn)}
    assert [s.mean.shape for s in m.bn] == [(6,), (4,), (16,)]
    unused = by_layer[id(model.unused)]
    assert not unused.trains and np.isnan(unused.mean).all() and np.isnan(unused.variance).all()
    # numpy on each called layer's inputs, batch by batch (training mode: batch statistics)
    batches = [x[s:s + 30] for s in range(0, len(x), 30)]
    hidden_inputs = [ops.convert_to_numpy(model.hidden(model.bn_in(b, training=True)))
                     for b in batches]
    for layer, inputs in ((model.bn_in, batches), (model.bn, hidden_inputs)):
        stats = by_layer[id(layer)]
        mean, var = _population(inputs)
        assert stats.trains
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-5, atol=1e-6)


def test_no_bn_means_no_precise_bn_and_frozen_bn_is_not_recomputed():
    keras.utils.set_random_seed(4)
    x, y = blobs(64)
    model = mlp(dropout=0.2)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m = gaptrack.measure(model, (x, y), batch_size=16)
    assert m.precise_bn is None and m.bn == []

    frozen = mlp(bn=True)
    for layer in frozen.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    frozen.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    frozen.fit(x, y, batch_size=16, epochs=1, verbose=0)
    m = gaptrack.measure(frozen, (x, y), batch_size=16)
    assert m.precise_bn is None  # nothing trains, so nothing to recompute
    assert [s.trains for s in m.bn] == [False, False]
    # a frozen BN runs in inference mode in training too: train_mode == eval_train
    assert_close(m.train_mode, m.eval_train)


def test_measure_rejects_bad_input():
    x, y = blobs(32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    with pytest.raises(MeasureError, match="not compiled"):
        gaptrack.measure(model, (x, y))
    model.compile("sgd", "mse")
    with pytest.raises(MeasureError, match="batch_size must be a positive integer, got 0"):
        gaptrack.measure(model, (x, y), batch_size=0)
    with pytest.raises(ValueError, match="probe_size must be a positive integer, got -3"):
        gaptrack.measure(model, (x, y), probe_size=-3)
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(ValueError, match=r"infinite.*take\("):
        gaptrack.measure(model, infinite)


def _masked_per_timestep(reduction="sum_over_batch_size"):
    inp = keras.Input((10,))
    h = keras.layers.Embedding(20, 4, mask_zero=True)(inp)
    h = keras.layers.GRU(6, return_sequences=True)(keras.layers.BatchNormalization()(h))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(reduction=reduction))
    return model


@pytest.mark.parametrize("case, batch", [("masked", 32), ("sum", 32), ("plain", 1024),
                                         ("masked, inference_batch_size=50", 50)])
def test_eval_train_follows_evaluate_where_the_batching_changes_the_loss(case, batch):
    """A masked per-timestep loss is divided batch by batch by the batch's unmasked
    count, a ``sum`` loss is a batch's sum: evaluate() depends on its batch size,
    and eval_train is measured at it. Elsewhere one large batch gives the same."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 20, size=(150, 10))
    x[np.arange(10)[None, :] >= rng.integers(2, 11, size=150)[:, None]] = 0
    y = x % 3
    model = _masked_per_timestep("sum" if case == "sum" else "sum_over_batch_size")
    if case == "plain":
        x, y = blobs(150)
        model = mlp()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    inference = 50 if batch == 50 else None
    m = gaptrack.measure(model, (x, y), batch_size=16, inference_batch_size=inference)
    expected = model.evaluate(x, y, batch_size=inference, verbose=0, return_dict=True)
    assert_close(m.eval_train, expected)
    if case == "plain":  # the value does not depend on the batching, the large batch is kept
        big = model.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)
        assert_close(m.eval_train, big)
    elif inference is None:  # the batching matters: one large batch would differ
        whole = model.evaluate(x, y, batch_size=150, verbose=0, return_dict=True)
        assert abs(whole["loss"] - expected["loss"]) > 1e-5 * expected["loss"]


def test_a_measurement_shows_its_numbers_not_its_arrays():
    """The notebook case: a deep BN model's measurement displays in a few lines."""
    keras.utils.set_random_seed(0)
    x, y = blobs(256)
    model = mlp(bn=True, depth=20, width=32)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    m = gaptrack.measure(model, (x, y), batch_size=64)
    assert len(m.bn) == 20
    text = repr(m)
    assert len(text) < 2000 and "array(" not in text and "\n" not in text
    for kind in ("eval_train", "train_mode", "precise_bn"):
        values = getattr(m, kind)
        assert f"{kind}={{'loss': {values['loss']:.4g}, 'accuracy': {values['accuracy']:.4g}}}" \
            in text
    assert "bn=<20 BN layers, 20 training>" in text
    assert f"loss_standard_error={m.loss_standard_error:.4g}" in text
    page = m._repr_html_()
    assert len(page) < 4000 and "on 256 samples, training batch size 64" in page
    for name in ("loss", "accuracy"):
        assert f">{m.train_mode[name]:.4g}<" in page and f">{m.eval_train[name]:.4g}<" in page


def test_a_loss_that_averages_the_batch_itself_is_measured_without_a_noise_estimate():
    """A user's loss returning one value a batch (no per-sample values): eval_train
    as evaluate() gives it (the mean of the batches' values), and no standard
    error, since there are no per-sample losses to take it from (it crashed)."""
    keras.utils.set_random_seed(0)
    x, y = blobs(64)
    onehot = keras.utils.to_categorical(y, 3)
    model = mlp(bn=True)

    def batch_loss(y_true, y_pred):
        return ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))

    model.compile("adam", batch_loss)
    model.fit(x, onehot, batch_size=16, epochs=1, verbose=0)
    m = gaptrack.measure(model, (x, onehot), batch_size=16)
    evaluated = model.evaluate(x, onehot, verbose=0, return_dict=True)["loss"]
    assert m.eval_train["loss"] == pytest.approx(evaluated, rel=1e-6)
    per_batch = [float(batch_loss(onehot[i:i + 16], model(x[i:i + 16], training=False)))
                 for i in range(0, 64, 16)]
    assert m.eval_train["loss"] == pytest.approx(np.mean(per_batch), rel=1e-6)
    assert m.loss_standard_error is None
