"""The weights' digest read on the device: against numpy, and what the tracker
reads to the host each epoch."""

import keras
import numpy as np
import pytest

import gaptrack
from builders import blobs, mlp
from gaptrack.weights import digest


def numpy_digest(model):
    """(finite, per-variable wrapped int32 sums of the float32 bits), in numpy."""
    values = [v.numpy() for v in model.weights]
    finite = all(np.isfinite(a).all() for a in values)
    sums = [np.sum(a.view(np.int32), dtype=np.int32) for a in values]
    return finite, np.array(sums, dtype=np.int32).tobytes()


def test_digest_is_the_bit_sums_and_finiteness_numpy_computes():
    keras.utils.set_random_seed(0)
    model = mlp(bn=True)
    model(blobs(8)[0])
    first = digest(model)
    assert (first.finite, first.fingerprint) == numpy_digest(model)
    weights = model.get_weights()

    nudged = [w.copy() for w in weights]
    nudged[0].flat[5] = np.nextafter(nudged[0].flat[5], np.float32(np.inf))  # one ulp
    model.set_weights(nudged)
    assert digest(model).fingerprint != first.fingerprint
    assert digest(model).fingerprint == numpy_digest(model)[1]

    for bad in (np.nan, np.inf):
        broken = [w.copy() for w in weights]
        broken[2].flat[0] = bad  # the first BN layer's gamma
        model.set_weights(broken)
        assert digest(model).finite is False
        assert numpy_digest(model)[0] is False

    model.set_weights(weights)  # put back, as EarlyStopping restores
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
    assert bn and not [v.path for v in model.weights if id(v) in read and id(v) not in bn]
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    assert tracker.records[-1].eval_train["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
