"""BN snapshots and per-layer staleness, read back through MLflow."""

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack.bn import staleness
from gaptrack.snapshots import COLUMNS, SnapshotError


class TwoBlocks(keras.Model):
    """Two separately built copies of one inner functional model, both named
    ``block`` with a layer ``bn`` (a functional outer model would refuse the
    duplicate names; a subclassed one does not), and a BN of its own."""

    def __init__(self):
        super().__init__()
        self.stem = keras.layers.Dense(8)
        self.a, self.b = self._inner(), self._inner()
        self.head_bn = keras.layers.BatchNormalization(name="head_bn")
        self.out = keras.layers.Dense(3, activation="softmax")

    @staticmethod
    def _inner():
        i = keras.Input((8,))
        h = keras.layers.Dense(8, name="dense_in")(i)
        return keras.Model(i, keras.layers.BatchNormalization(name="bn")(h), name="block")

    def call(self, x, training=False):
        h = self.stem(x)
        h = self.a(h, training=training) + self.b(h, training=training)
        return self.out(self.head_bn(h, training=training))


def nested_bn_model():
    model = TwoBlocks()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.parametrize("store", [
    "sqlite_uri",
    # the same computation over HTTP: the other backends' runs leave it out
    pytest.param("server_uri", marks=pytest.mark.backend_independent),
])
def test_snapshots_equal_the_layers_own_variables(store, request):
    request.getfixturevalue(store)
    keras.utils.set_random_seed(0)
    x, y = blobs(96)
    model = nested_bn_model()
    tracker = gaptrack.GapTracker((x, y), batch_size=32)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[tracker])
    df = gaptrack.load_bn_snapshots(tracker.run_id)
    assert tuple(df.columns) == COLUMNS
    assert sorted(df.epoch.unique()) == [0, 1]
    assert list(df[df.epoch == 1].layer.unique()) == ["block/bn", "block:2/bn", "head_bn"]
    layers = {"block/bn": model.a.get_layer("bn"), "block:2/bn": model.b.get_layer("bn"),
              "head_bn": model.head_bn}
    assert layers["block/bn"] is not layers["block:2/bn"]
    last = df[df.epoch == 1]
    for path, layer in layers.items():
        rows = last[last.layer == path].sort_values("channel")
        for column, variable in [("moving_mean", layer.moving_mean),
                                 ("moving_variance", layer.moving_variance),
                                 ("gamma", layer.gamma), ("beta", layer.beta)]:
            np.testing.assert_array_equal(rows[column].to_numpy(),
                                          variable.numpy().astype(np.float64))
        assert rows.trains.all()
    # staleness/<stat>/<layer> metrics: the staleness of the logged snapshot, per layer key
    client = MlflowClient()
    metrics = client.get_run(tracker.run_id).data.metrics
    for path, key in [("block/bn", "block.bn"), ("block:2/bn", "block:2.bn"),
                      ("head_bn", "head_bn")]:
        rows = last[last.layer == path]
        mean_lag, var_lag = staleness(rows.moving_mean, rows.moving_variance,
                                      rows.population_mean, rows.population_variance, 1e-3)
        assert metrics[f"staleness/mean/{key}"] == pytest.approx(mean_lag, rel=1e-9)
        assert metrics[f"staleness/var/{key}"] == pytest.approx(var_lag, rel=1e-9)
    for stat in ("mean", "var"):
        worst = max(metrics[f"staleness/{stat}/{k}"] for k in ("block.bn", "block:2.bn", "head_bn"))
        assert metrics[f"staleness/worst/{stat}"] == worst


def test_population_statistics_in_the_snapshot_equal_numpy(sqlite_uri):
    keras.utils.set_random_seed(1)
    x, y = blobs(80)
    model = mlp(bn=True, depth=1)
    tracker = gaptrack.GapTracker((x, y), batch_size=20)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[tracker])
    dense = model.layers[0]
    # the BN's input (nothing random before it)
    h = keras.ops.convert_to_numpy(dense(x)).astype(np.float64)
    batches = [h[s:s + 20] for s in range(0, 80, 20)]
    mean = np.mean([b.mean(0) for b in batches], axis=0)  # equal batch sizes
    var = np.mean([b.var(0) for b in batches], axis=0)
    df = gaptrack.load_bn_snapshots(tracker.run_id)
    np.testing.assert_allclose(df.population_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df.population_variance, var, rtol=1e-5, atol=1e-6)
    assert len(df) == 16  # O(channels): 16 channels, one epoch


def test_model_without_bn_has_no_snapshot_and_no_bn_metrics(sqlite_uri):
    x, y = blobs(48)
    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    mlp(dropout=0.2).fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tracker])
    metrics = MlflowClient().get_run(tracker.run_id).data.metrics
    assert "gap/loss" in metrics
    assert not [k for k in metrics if k.startswith(("staleness/", "precise_bn/"))]
    with pytest.raises(SnapshotError, match="has no BN snapshots"):
        gaptrack.load_bn_snapshots(tracker.run_id)


def test_unknown_run_is_a_clear_error(sqlite_uri):
    mlflow.set_experiment("x")  # creates the store
    with pytest.raises(SnapshotError, match="run 'deadbeef' not found"):
        gaptrack.load_bn_snapshots("deadbeef")
