"""The weights' digest read on the device: against numpy, and what the tracker
reads to the host each epoch."""

import keras
import numpy as np
import pytest

import gaptrack
from builders import blobs, mlp
from gaptrack.weights import SAMPLE, digest, sampled_indices


def numpy_digest(model):
    """(finite, per-variable wrapped int32 sums of the float32 bits of every
    ``ceil(size / SAMPLE)``-th value), in numpy."""
    values = [v.numpy().ravel() for v in model.weights]
    samples = [a[::max(1, -(-a.size // SAMPLE))] for a in values]
    finite = all(np.isfinite(a).all() for a in samples)
    sums = [np.sum(a.view(np.int32), dtype=np.int32) for a in samples]
    return finite, np.array(sums, dtype=np.int32).tobytes()


def test_digest_is_the_bit_sums_and_finiteness_of_the_sample_numpy_computes():
    keras.utils.set_random_seed(0)
    x, y = blobs(64)
    model = mlp(width=100, bn=True)  # the 100 x 100 kernel (10,000 values) is sampled
    model(x[:1])
    kernel = model.layers[2].kernel
    assert kernel.shape == (100, 100) and len(sampled_indices(10_000)) == 3334 <= SAMPLE
    assert max(len(sampled_indices(int(np.prod(v.shape)))) for v in model.weights) <= SAMPLE
    first = digest(model)
    assert (first.finite, first.fingerprint) == numpy_digest(model)
    weights = model.get_weights()
    k = [w.shape for w in weights].index((100, 100))

    nudged = [w.copy() for w in weights]
    nudged[k].flat[3] = np.nextafter(nudged[k].flat[3], np.float32(np.inf))  # one ulp, sampled
    model.set_weights(nudged)
    assert digest(model).fingerprint != first.fingerprint
    assert digest(model).fingerprint == numpy_digest(model)[1]
    # what the sample cannot see: a value between the sampled ones
    between = [w.copy() for w in weights]
    between[k].flat[4] += 1.0
    model.set_weights(between)
    assert 4 not in sampled_indices(10_000)
    assert digest(model) == first and numpy_digest(model)[1] == first.fingerprint

    for bad in (np.nan, np.inf):
        broken = [w.copy() for w in weights]
        broken[2].flat[0] = bad  # the first BN layer's gamma, read whole
        model.set_weights(broken)
        assert digest(model).finite is False
        assert numpy_digest(model)[0] is False

    model.set_weights(weights)  # put back, as EarlyStopping restores
    assert digest(model) == first
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # one epoch changes every variable's sample
    trained = digest(model)
    assert trained.fingerprint == numpy_digest(model)[1]
    per_variable = np.frombuffer(trained.fingerprint, np.int32) != np.frombuffer(first.fingerprint,
                                                                                  np.int32)
    assert per_variable[[i for i, v in enumerate(model.weights) if v.trainable]].all()
    model.set_weights(weights)
    assert digest(model) == first


def test_the_tracker_reads_no_weight_to_the_host_per_epoch(sqlite_uri, monkeypatch):
    """Fingerprint and finiteness are read on the device: of all the weights,
    only the BN layers' per-channel values (the snapshot) reach numpy."""
    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    model = mlp(bn=True)
    model(x[:1])
    variable_type = type(model.weights[0])
    read = []
    for name in ("numpy", "__array__"):
        original = getattr(variable_type, name)

        def counted(self, *args, _original=original, **kwargs):
            read.append(id(self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(variable_type, name, counted)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
    monkeypatch.undo()
    assert [r.step for r in tracker.records if r.eval_train] == [0, 1]
    bn = {id(v) for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
          for v in layer.weights}
    assert bn and bn & set(read)  # the hook sees reads: the BN snapshot's
    assert not [v.path for v in model.weights if id(v) in read and id(v) not in bn]
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert tracker.records[-1].eval_train["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
