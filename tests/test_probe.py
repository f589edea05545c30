"""Tests of gaptrack.probe against independent computations.

Every sampled row is traced back to the original data with numpy (an index
feature, or exact row matching), so "a subset in original order with the labels
of the same rows" is checked, not assumed. The reservoir sampler of
``tf.data.Dataset`` probes is checked for uniformity over many seeds with a
chi-square bound that a biased sampler ("the first n", "the last n") fails.
"""

import re
import warnings

import numpy as np
import pytest
import tensorflow as tf

from gaptrack.probe import DEFAULT_PROBE_SIZE, Probe, ProbeError


def indexed(n, features=3, seed=0):
    """``x`` whose column 0 is the sample index, ``y`` and ``sw`` functions of it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    x[:, 0] = np.arange(n)
    y = (np.arange(n) * 7) % 5
    sw = (np.arange(n) / 100.0).astype("float32")
    return x, y, sw


def original_rows(x_sample, x):
    """Index in ``x`` of every row of ``x_sample`` (rows of ``x`` are distinct)."""
    matches = np.all(x_sample[:, None, :] == x[None, :, :], axis=-1)
    assert np.all(matches.sum(axis=1) == 1), "a probe row is not a row of the data"
    return matches.argmax(axis=1)


# -- numpy data ----------------------------------------------------------------------


@pytest.mark.parametrize("with_sw", [False, True])
@pytest.mark.parametrize("probe_size", [20, 50, None])
def test_small_numpy_data_is_kept_whole_without_copy(with_sw, probe_size):
    x, y, sw = indexed(20)
    data = (x, y, sw) if with_sw else (x, y)
    probe = Probe.from_data(data, probe_size=probe_size)
    assert probe.x is x and probe.y is y
    assert probe.sample_weight is (sw if with_sw else None)
    assert (probe.size, probe.total, probe.dataset_batch_size) == (20, 20, None)


def test_default_probe_size_keeps_data_up_to_the_default():
    x = np.zeros((DEFAULT_PROBE_SIZE, 1), "float32")
    y = np.zeros(DEFAULT_PROBE_SIZE)
    assert Probe.from_data((x, y)).x is x
    x1, y1 = np.zeros((DEFAULT_PROBE_SIZE + 1, 1)), np.zeros(DEFAULT_PROBE_SIZE + 1)
    assert Probe.from_data((x1, y1)).size == DEFAULT_PROBE_SIZE


def test_large_numpy_data_is_an_ordered_subset_with_matching_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4))  # distinct rows, no index feature needed
    y = rng.integers(0, 10, size=300)
    sw = rng.uniform(size=300)
    probe = Probe.from_data((x, y, sw), probe_size=37, seed=5)
    assert (probe.size, probe.total) == (37, 300)
    assert probe.x.shape == (37, 4)
    idx = original_rows(probe.x, x)
    assert np.all(np.diff(idx) > 0)  # distinct and in original order
    np.testing.assert_array_equal(probe.y, y[idx])
    np.testing.assert_array_equal(probe.sample_weight, sw[idx])


def test_numpy_sample_is_reproducible_and_depends_on_seed():
    x, y, _ = indexed(200)
    a = Probe.from_data((x, y), probe_size=30, seed=3)
    b = Probe.from_data((x, y), probe_size=30, seed=3)
    c = Probe.from_data((x, y), probe_size=30, seed=4)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert set(a.x[:, 0]) != set(c.x[:, 0])


def test_numpy_sample_is_uniform_over_seeds():
    total, size, seeds = 40, 10, 400
    x, y, _ = indexed(total)
    counts = np.zeros(total)
    for seed in range(seeds):
        counts[Probe.from_data((x, y), probe_size=size, seed=seed).x[:, 0].astype(int)] += 1
    assert_uniform_inclusion(counts, seeds, size / total)


def assert_uniform_inclusion(counts, draws, p):
    """Each index is included ``Binomial(draws, p)`` times. Pearson's statistic
    (variance ``draws * p * (1 - p)`` per index) is about chi2 with
    ``len(counts) - 1`` degrees of freedom: bounded 6 standard deviations above
    its mean; no index may be more than 4.5 standard deviations off."""
    expected = draws * p
    sd = np.sqrt(draws * p * (1 - p))
    chi2 = np.sum((counts - expected) ** 2 / (expected * (1 - p)))
    k = len(counts)
    assert chi2 < k + 6 * np.sqrt(2 * k), (chi2, counts)
    assert np.max(np.abs(counts - expected)) < 4.5 * sd, counts
    assert counts.sum() == draws * p * k


def test_multi_input_and_multi_output_structures_are_sampled_together():
    n = 60
    i = np.arange(n)
    xa = np.stack([i, -i], axis=1).astype("float32")
    xb = np.stack([i * 2.0] * 4, axis=1)
    y1 = i * 3
    y2 = np.stack([i, i + 1, i * 5], axis=1)
    x, y = {"a": xa, "b": xb}, [y1, y2]

    probe = Probe.from_data((x, y), probe_size=12, seed=2)
    assert set(probe.x) == {"a", "b"} and isinstance(probe.y, list) and len(probe.y) == 2
    idx = probe.x["a"][:, 0].astype(int)
    assert len(idx) == 12 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(probe.x["a"], xa[idx])
    np.testing.assert_array_equal(probe.x["b"], xb[idx])
    np.testing.assert_array_equal(probe.y[0], y1[idx])
    np.testing.assert_array_equal(probe.y[1], y2[idx])
    assert (probe.size, probe.total) == (12, n)

    whole = Probe.from_data(([xa, xb], {"o1": y1, "o2": y2}), probe_size=n)
    assert whole.x[0] is xa and whole.x[1] is xb
    assert whole.y["o1"] is y1 and whole.y["o2"] is y2
    assert (whole.size, whole.total) == (n, n)


def test_tensors_are_converted_to_numpy():
    x, y, _ = indexed(6)
    probe = Probe.from_data((tf.constant(x), tf.constant(y)))
    assert isinstance(probe.x, np.ndarray) and isinstance(probe.y, np.ndarray)
    np.testing.assert_array_equal(probe.x, x)
    np.testing.assert_array_equal(probe.y, y)
    assert (probe.size, probe.total) == (6, 6)


def test_a_probe_passes_through():
    probe = Probe.from_data(indexed(5)[:2])
    assert Probe.from_data(probe, probe_size=2) is probe


# -- batches -------------------------------------------------------------------------


def test_batches_cover_all_samples_in_order_last_one_partial():
    x, y, sw = indexed(10)
    probe = Probe.from_data(({"in": x}, y, sw))
    parts = list(probe.batches(4))
    assert [len(b[1]) for b in parts] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0]["in"] for b in parts]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in parts]), y)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in parts]), sw)
    assert all(b[2] is None for b in Probe.from_data((x, y)).batches(3))


# -- tf.data -------------------------------------------------------------------------


def dataset(x, y, sw=None, batch=4):
    data = (x, y) if sw is None else (x, y, sw)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch)


@pytest.mark.parametrize("with_sw", [False, True])
def test_small_dataset_is_read_whole(with_sw):
    x, y, sw = indexed(10)
    probe = Probe.from_data(dataset(x, y, sw if with_sw else None, batch=4), probe_size=10)
    np.testing.assert_array_equal(probe.x, x)
    np.testing.assert_array_equal(probe.y, y)
    if with_sw:
        np.testing.assert_array_equal(probe.sample_weight, sw)
    else:
        assert probe.sample_weight is None
    assert (probe.size, probe.total, probe.dataset_batch_size) == (10, 10, 4)


def test_dataset_batch_size_is_the_first_batch():
    x, y, _ = indexed(12)
    ds = dataset(x[:3], y[:3], batch=3).concatenate(dataset(x[3:], y[3:], batch=8))
    probe = Probe.from_data(ds)
    assert probe.dataset_batch_size == 3
    np.testing.assert_array_equal(probe.x, x)


def test_large_dataset_reservoir_sample_is_distinct_with_matching_labels():
    x, y, sw = indexed(50)
    probe = Probe.from_data(dataset(x, y, sw, batch=7), probe_size=12, seed=1)
    assert (probe.size, probe.total, probe.dataset_batch_size) == (12, 50, 7)
    idx = probe.x[:, 0].astype(int)
    assert len(set(idx)) == 12 and np.all((idx >= 0) & (idx < 50))
    np.testing.assert_array_equal(probe.x, x[idx])
    np.testing.assert_array_equal(probe.y, y[idx])
    np.testing.assert_array_equal(probe.sample_weight, sw[idx])


def test_dataset_sample_is_reproducible_and_depends_on_seed():
    x, y, _ = indexed(50)
    ds = dataset(x, y, batch=6)
    a = Probe.from_data(ds, probe_size=10, seed=7)
    b = Probe.from_data(ds, probe_size=10, seed=7)
    c = Probe.from_data(ds, probe_size=10, seed=8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert set(a.x[:, 0]) != set(c.x[:, 0])


def test_dataset_reservoir_sample_is_uniform_over_seeds():
    # 40 samples in batches of 7 (the last one has 5): probe_size 10 straddles a
    # batch, and every batch after it goes through the replacement step.
    total, size, seeds = 40, 10, 400
    x, y, _ = indexed(total)
    ds = dataset(x, y, batch=7)
    counts = np.zeros(total)
    for seed in range(seeds):
        probe = Probe.from_data(ds, probe_size=size, seed=seed)
        idx = probe.x[:, 0].astype(int)
        assert len(set(idx)) == size
        np.testing.assert_array_equal(probe.y, y[idx])
        counts[idx] += 1
    assert_uniform_inclusion(counts, seeds, size / total)


def test_uniformity_check_rejects_the_first_n():
    counts = np.zeros(40)
    counts[:10] = 400
    with pytest.raises(AssertionError):
        assert_uniform_inclusion(counts, 400, 0.25)


def test_multi_input_dataset():
    x, y, _ = indexed(20)
    ds = tf.data.Dataset.from_tensor_slices(({"a": x, "b": x[:, :1] * 2}, y)).batch(6)
    probe = Probe.from_data(ds, probe_size=8, seed=0)
    idx = probe.x["a"][:, 0].astype(int)
    assert len(set(idx)) == 8
    np.testing.assert_array_equal(probe.x["b"][:, 0], 2 * idx)
    np.testing.assert_array_equal(probe.y, y[idx])
    assert (probe.total, probe.dataset_batch_size) == (20, 6)


def test_infinite_dataset_is_an_error_that_suggests_take():
    x, y, _ = indexed(10)
    with pytest.raises(ProbeError, match=re.escape("take(")):
        Probe.from_data(dataset(x, y).repeat())


@pytest.mark.parametrize("batch", [4, 5, 20])
def test_unknown_cardinality_gives_the_first_samples_with_a_warning(batch):
    x, y, sw = indexed(30)
    ds = (tf.data.Dataset.from_tensor_slices((x, y, sw))
          .filter(lambda *_: True).batch(batch))
    assert int(ds.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    with pytest.warns(UserWarning, match="unknown cardinality"):
        probe = Probe.from_data(ds, probe_size=10, seed=3)
    np.testing.assert_array_equal(probe.x, x[:10])
    np.testing.assert_array_equal(probe.y, y[:10])
    np.testing.assert_array_equal(probe.sample_weight, sw[:10])
    assert (probe.size, probe.total, probe.dataset_batch_size) == (10, None, batch)


def test_unknown_cardinality_smaller_than_probe_is_read_whole_without_warning():
    x, y, _ = indexed(9)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = Probe.from_data(ds, probe_size=10)
    np.testing.assert_array_equal(probe.x, x)
    assert probe.size == 9


# -- errors --------------------------------------------------------------------------


def test_empty_numpy_data_is_an_error():
    with pytest.raises(ProbeError, match="empty"):
        Probe.from_data((np.zeros((0, 3)), np.zeros(0)))


def test_empty_dataset_is_an_error():
    x, y, _ = indexed(10)
    with pytest.raises(ProbeError, match="empty"):
        Probe.from_data(dataset(x[:0], y[:0]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_probe_size_is_named(bad):
    x, y, _ = indexed(10)
    with pytest.raises(ProbeError, match=re.escape(f"got {bad!r}")):
        Probe.from_data((x, y), probe_size=bad)
    with pytest.raises(ProbeError, match=re.escape(f"got {bad!r}")):
        Probe.from_data(dataset(x, y), probe_size=bad)


def test_numpy_integer_probe_size_is_accepted():
    x, y, _ = indexed(10)
    assert Probe.from_data((x, y), probe_size=np.int64(4)).size == 4


@pytest.mark.parametrize("data", [
    (np.zeros((4, 2)),),
    (np.zeros((4, 2)), None),
    np.zeros((4, 2)),
])
def test_missing_targets_are_an_error(data):
    with pytest.raises(ProbeError, match="with targets"):
        Probe.from_data(data)


def test_dataset_without_targets_is_an_error():
    with pytest.raises(ProbeError, match="with targets"):
        Probe.from_data(tf.data.Dataset.from_tensor_slices(np.zeros((4, 2))).batch(2))


def test_arrays_of_different_lengths_are_an_error():
    with pytest.raises(ProbeError, match=re.escape("[4, 5]")):
        Probe.from_data((np.zeros((5, 2)), np.zeros(4)))


@pytest.mark.parametrize("one_hot", [False, True], ids=["class_ids", "one_hot"])
def test_class_weight_becomes_the_sample_weight_fit_derives(one_hot):
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 4, size=50)
    y = np.eye(4, dtype="float32")[classes] if one_hot else classes
    x = rng.normal(size=(50, 3)).astype("float32")
    probe = Probe.from_data((x, y), probe_size=20, seed=1)
    weighted = probe.with_class_weight({0: 2.0, 2: 0.5})  # class 1 and 3 not named: 1
    table = np.array([2.0, 1.0, 0.5, 1.0])
    labels = probe.y.argmax(-1) if one_hot else probe.y
    np.testing.assert_array_equal(weighted.sample_weight, table[labels])
    assert weighted.x is probe.x and weighted.y is probe.y and probe.sample_weight is None
    assert (weighted.size, weighted.total) == (20, 50)


def test_class_weight_refusals_name_the_value():
    x, y = np.zeros((4, 2), "float32"), np.array([0, 1, 0, 1])
    with pytest.raises(ProbeError, match=r"class_weight must be a dict .* got \[1\.0, 2\.0\]"):
        Probe.from_data((x, y)).with_class_weight([1.0, 2.0])
    with pytest.raises(ProbeError, match="class_weight and sample_weight cannot be used together"):
        Probe.from_data((x, y, np.ones(4))).with_class_weight({0: 2.0})
    with pytest.raises(ProbeError, match="one output"):
        Probe.from_data((x, {"a": y, "b": y})).with_class_weight({0: 2.0})


def test_a_pipeline_with_random_ops_is_named_and_a_clean_one_is_not():
    """Augmentation in map() makes the probe one frozen random draw: warned, with
    the op found in the pipeline's graph; shuffling alone is not augmentation."""
    import keras

    from gaptrack.probe import ProbeWarning

    x = np.random.default_rng(0).random((32, 4, 4, 3)).astype("float32")
    y = np.arange(32) % 3
    base = tf.data.Dataset.from_tensor_slices((x, y))
    flip = keras.layers.RandomFlip("horizontal", seed=1)
    augmented = {
        "RandomUniform": base.map(lambda a, b: (tf.image.random_flip_left_right(a), b)).batch(8),
        "RandomStandardNormal": base.batch(8).map(
            lambda a, b: (a + tf.random.normal(tf.shape(a)), b)),
        "StatelessRandomUniformV2": base.batch(8).map(lambda a, b: (flip(a, training=True), b)),
    }
    for op, dataset in augmented.items():
        with pytest.warns(ProbeWarning, match=f"draws random numbers .*{op}.*pipeline without"):
            probe = Probe.from_data(dataset)
        assert probe.size == 32
    # what the warning is about: the probe is not the training data (two reads of the
    # pipeline may even agree, under a global seed: the graph is what tells)
    with pytest.warns(ProbeWarning):
        assert not np.allclose(Probe.from_data(augmented["RandomStandardNormal"]).x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for clean in (base.batch(8), base.shuffle(32, seed=0).batch(8)):
            assert Probe.from_data(clean).size == 32


# -- one draw of an infinite pipeline ---------------------------------------------------


def oversampled(x, y, batch, seed=1):
    """The seed's pipeline: each class shuffled and repeated, mixed half and half by
    ``sample_from_datasets``, batched; ``seed=None``: no op seed."""

    def one(label):
        keep = y == label
        pairs = tf.data.Dataset.from_tensor_slices((x[keep], y[keep]))
        return pairs.shuffle(int(keep.sum()), seed=seed).repeat()

    return tf.data.Dataset.sample_from_datasets([one(1), one(0)], [0.5, 0.5],
                                                seed=seed).batch(batch)


def first_pass(dataset, batches):
    """The first ``batches`` batches of a pass of ``dataset``, concatenated."""
    read = list(dataset.take(batches).as_numpy_iterator())
    return np.concatenate([b[0] for b in read]), np.concatenate([b[1] for b in read])


@pytest.mark.parametrize("seed", [1, None], ids=["op-seed", "global-seed"])
def test_a_pipeline_draw_is_the_first_pass_of_a_copy_and_shifts_nothing(seed):
    """Probe.from_pipeline reads a copy: the probe is the first batches a freshly
    built pipeline yields (what fit's first epoch reads, seeds fixed), and the
    pipeline's own first pass is still that one afterwards (a pass read from the
    pipeline itself would have moved its shuffles on by one: checked)."""
    from gaptrack.probe import ProbeWarning

    x, y, _ = indexed(90)
    y = (np.arange(90) % 9 == 0).astype("int64")  # 10 positives, oversampled to half
    tf.random.set_seed(7)
    fresh = first_pass(oversampled(x, y, 8, seed), 3)
    tf.random.set_seed(7)
    pipeline = oversampled(x, y, 8, seed)
    with pytest.warns(ProbeWarning) as caught:
        probe = Probe.from_pipeline(pipeline, steps=3)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "one fixed draw" in message and "first 3 batches (24 samples)" in message
    assert "samples at random (RandomDataset, ShuffleDatasetV3)" in message
    assert "gaptrack.autolog(probe=(x, y))" in message
    assert probe.origin in message and probe.total is None
    np.testing.assert_array_equal(probe.x, fresh[0])
    np.testing.assert_array_equal(probe.y, fresh[1])
    assert (probe.size, probe.dataset_batch_size) == (24, 8) and 0.3 < probe.y.mean() < 0.7
    after = first_pass(pipeline, 3)
    np.testing.assert_array_equal(after[0], fresh[0])
    # the pitfall the copy avoids: a pass of the pipeline itself moves the next one on
    assert not np.array_equal(first_pass(pipeline, 3)[0], fresh[0])


def test_a_pipeline_draw_stops_at_the_probe_size_in_whole_batches():
    """At most probe_size samples, whole batches (the first cut when it alone is
    larger); no steps: no limit in batches; and a plain repeat is no random draw."""
    x, y, _ = indexed(50)
    pipeline = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)
    with pytest.warns(UserWarning) as caught:
        sizes = [Probe.from_pipeline(pipeline, None, n).size for n in (20, 24, 5)]
        whole = Probe.from_pipeline(pipeline, steps=10, probe_size=1000)
    assert sizes == [16, 24, 5]
    assert whole.size == 80 and "its first 10 batches (80 samples)" in whole.origin
    np.testing.assert_array_equal(whole.x[:, 0], np.arange(80) % 50)
    assert not any("at random" in str(w.message) for w in caught)


def test_a_pipeline_that_shares_state_with_fit_is_not_copied():
    """A map() that draws from an iterator: a copy would advance it for fit too,
    so there is no draw, and the error says why; GapTracker given an infinite
    dataset keeps refusing it, suggesting take()."""
    import gaptrack

    labels = iter(tf.data.Dataset.range(10**6))
    x, _, _ = indexed(20)
    pipeline = tf.data.Dataset.from_tensor_slices(x).map(
        lambda a: (a, labels.get_next() % 2)).repeat().batch(4)
    before = next(labels).numpy()
    with pytest.raises(ProbeError, match="cannot be copied without sharing state with fit.*"
                                         "MapDataset reads a resource"):
        Probe.from_pipeline(pipeline, steps=2)
    assert next(labels).numpy() == before + 1  # nothing read from it
    with pytest.raises(ProbeError, match=r"infinite tf.data.Dataset.*take\("):
        gaptrack.GapTracker(pipeline.take(10).repeat())
