"""recalibrate_bn: PreciseBN in place closes the bn_ema part of the gap."""

import keras
import numpy as np
import pytest

import gaptrack
from builders import all_state, blobs, mlp


def test_recalibration_closes_the_gap_of_a_few_step_bn_model():
    keras.utils.set_random_seed(0)
    x, y = blobs(1024)
    model = mlp(bn=True, depth=8, width=32, lr=1e-3)
    model.fit(x, y, batch_size=512, epochs=2, verbose=0)  # 4 steps
    before = gaptrack.measure(model, (x, y), batch_size=512)
    state = [v.numpy().copy() for v in model.trainable_variables]
    optimizer_state = [v.numpy().copy() for v in model.optimizer.variables]
    table = gaptrack.recalibrate_bn(model, (x, y), batch_size=512)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    for name in after:
        assert after[name] == pytest.approx(before.precise_bn[name], rel=1e-5)
    gap_before = abs(before.eval_train["loss"] - before.train_mode["loss"])
    gap_after = abs(after["loss"] - before.train_mode["loss"])
    assert gap_before > 0.1 and gap_after < gap_before / 5
    assert table.recalibrated.all() and len(table) == 8
    assert (table.staleness_mean_before > 0.1).all() and (table.staleness_mean_after < 1e-6).all()
    for a, b in zip(state, model.trainable_variables):
        assert a.tobytes() == b.numpy().tobytes()
    for a, b in zip(optimizer_state, model.optimizer.variables):
        assert a.tobytes() == b.numpy().tobytes()
    # the moving statistics now are the population statistics measure() saw
    for stats, layer in zip(before.bn, [l for l in model.layers
                                        if isinstance(l, keras.layers.BatchNormalization)]):
        np.testing.assert_allclose(layer.moving_mean.numpy(), stats.mean, rtol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), stats.variance, rtol=1e-6)


def test_frozen_layers_are_never_recalibrated():
    x, y = blobs(64)
    model = mlp(bn=True)
    frozen = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    frozen.trainable = False
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kept = frozen.moving_mean.numpy().copy(), frozen.moving_variance.numpy().copy()
    table = gaptrack.recalibrate_bn(model, (x, y), batch_size=16)
    assert table.trains.tolist() == [False, True]
    assert table.recalibrated.tolist() == [False, True]
    assert kept[0].tobytes() == frozen.moving_mean.numpy().tobytes()
    assert kept[1].tobytes() == frozen.moving_variance.numpy().tobytes()


def test_model_without_bn_is_left_alone():
    x, y = blobs(32)
    model = mlp()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = all_state(model)
    assert gaptrack.recalibrate_bn(model, (x, y), batch_size=16).empty
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, all_state(model)))
