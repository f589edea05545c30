"""Diagnosis: the noise rule by hand on synthetic histories, then the textbook
cases trained for real, their noise recomputed with numpy from per-sample losses."""

import doctest
import math

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp
from gaptrack import diagnosis as diagnosis_module
from gaptrack.diagnosis import DiagnosisError, diagnose, first_nonfinite_epoch, standard_error
from gaptrack.keys import PARTS, REPORT_DIR, diagnosis_tags, parse_records
from gaptrack.runs import load_history


def history(parts_by_epoch, noise=None, fit=None, eval_train=None, metric="loss"):
    """The records of a logged history: ``{epoch: (drift, mode, bn_ema)}`` -> the
    SPEC keys -> :func:`gaptrack.keys.parse_records`."""
    return parse_records(logged_keys(parts_by_epoch, noise, fit, eval_train, metric))


def logged_keys(parts_by_epoch, noise=None, fit=None, eval_train=None, metric="loss"):
    """``{key: {epoch: value}}``: ``{epoch: (drift, mode, bn_ema)}`` as the SPEC keys."""
    out = {f"gap/{metric}": {}, **{f"gap/{metric}/{p}": {} for p in PARTS}}
    for epoch, parts in parts_by_epoch.items():
        out[f"gap/{metric}"][epoch] = sum(parts)
        for name, value in zip(PARTS, parts):
            out[f"gap/{metric}/{name}"][epoch] = value
    out[f"fit/{metric}"] = fit or {e: 1.0 for e in parts_by_epoch}
    out[f"eval_train/{metric}"] = eval_train or {e: 0.5 for e in parts_by_epoch}
    if noise is not None:
        out["noise/loss"] = noise
    return out


def test_module_docstring_example():
    assert doctest.testmod(diagnosis_module).failed == 0


def test_noise_rule_by_hand():
    """``none`` iff the gap and every part are within z * SE (z = 1); else the
    largest part by magnitude, whatever its sign. Dyadic numbers: exact sums."""
    rng = np.random.default_rng(0)
    cases = [((0.125, 0.0625, -0.0625), 0.125), ((0.125, 0.0625, -0.0625), 0.0625),
             ((0.25, -0.375, 0.0), 0.25), ((0.0, 0.0, 0.0), 0.0), ((0.5, -0.5, 0.0), 0.25)]
    cases += [(tuple(rng.normal(scale=0.1, size=3)), abs(rng.normal(scale=0.1)))
              for _ in range(50)]
    for parts, se in cases:
        d = diagnose(history({0: (0.0, 0.0, 0.0), 3: parts}, noise={0: 9.9, 3: se}))
        magnitudes = np.abs([sum(parts), *parts])
        expected = "none" if magnitudes.max() <= se else PARTS[int(np.argmax(np.abs(parts)))]
        assert (d.cause, d.epoch, d.noise, d.threshold) == (expected, 3, se, se), parts
        assert d.gap == sum(parts) and d.parts == dict(zip(PARTS, parts))
        assert diagnosis_tags(d) == {"gaptrack.diagnosis": expected}
    # parts that cancel: the gap is within noise, the parts are not
    d = diagnose(history({0: (0.0, 0.5, -0.5)}, noise={0: 0.125}))
    assert d.gap == 0.0 and d.cause == "mode"
    # z is the number of standard errors
    d = diagnose(history({0: (0.25, 0.0, 0.0)}, noise={0: 0.125}), z=2)
    assert d.cause == "none" and d.threshold == 0.25


def test_accuracy_noise_is_binomial_and_no_noise_means_exact_zero():
    n, p = 48, 0.75
    logged = history({0: (0.0625, 0.0, 0.0)}, eval_train={0: p}, metric="accuracy")
    se = np.sqrt(p * (1 - p) / n)
    assert se == 0.0625  # sqrt(3/16 / 48) = 1/16: the gap sits on the boundary
    assert standard_error(logged[0], "accuracy", probe_size=n) == se
    assert diagnose(logged, "accuracy", probe_size=n).cause == "none"  # within is <=
    assert diagnose(logged, "accuracy", probe_size=n, z=0.5).cause == "drift"
    # without a probe size or for another metric there is no error bar
    assert diagnose(logged, "accuracy").noise is None
    assert diagnose(logged, "accuracy").cause == "drift"
    mae = history({0: (0.0, 0.0, 0.0)}, metric="mae")
    assert standard_error(mae[0], "mae", probe_size=n) is None
    assert diagnose(mae, "mae", probe_size=n).cause == "none"  # exactly 0


def test_nonfinite_first_epoch_from_fit_or_any_part():
    logged = history({0: (0.1, 0.0, 0.0), 2: (0.1, 0.0, 0.0), 4: (math.inf, 0.0, 0.0)},
                     noise={0: 0.01, 2: 0.01, 4: math.nan},
                     fit={0: 1.0, 1: 1.0, 2: 1.0, 3: math.nan, 4: math.nan})
    d = diagnose(logged)
    assert (d.cause, d.epoch, d.first_nonfinite_epoch) == ("nonfinite", 3, 3)
    assert diagnosis_tags(d) == {"gaptrack.diagnosis": "nonfinite",
                                 "gaptrack.nonfinite_epoch": "3"}
    assert math.isnan(d.fit) and math.isnan(d.gap)  # epoch 3 was not measured
    # a NaN in train_mode shows in drift and mode while the gap stays finite
    keys = logged_keys({0: (0.1, 0.0, 0.0), 1: (math.nan, math.nan, 0.0)})
    keys["gap/loss"][1] = 0.25
    logged = parse_records(keys)
    assert first_nonfinite_epoch(logged) == 1 and diagnose(logged).cause == "nonfinite"


def test_nothing_measured_is_an_error():
    with pytest.raises(DiagnosisError, match="no gap of 'accuracy' .* measured metrics: loss"):
        diagnose(history({0: (0.1, 0.0, 0.0)}), "accuracy")


# -- the textbook cases, trained ---------------------------------------------------


def per_sample_losses(model, x, y):
    """Keras' sparse categorical crossentropy in inference mode, by hand in
    numpy: ``logsumexp(z) - z[y]`` of the logits ``z`` of the final softmax
    layer (on a softmax output Keras takes the logits, it does not clip)."""
    head = model.layers[-1]
    features = keras.Model(model.inputs, model.layers[-2].output).predict(x, verbose=0)
    kernel, bias = (np.asarray(v.numpy(), dtype=np.float64) for v in (head.kernel, head.bias))
    z = np.asarray(features, dtype=np.float64) @ kernel + bias
    top = z.max(axis=1)
    logsumexp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return logsumexp - z[np.arange(len(y)), y]


def track(model, x, y, batch_size, epochs, **fit_kwargs):
    """Fit with a GapTracker; the run's history as read back from the store."""
    tracker = gaptrack.GapTracker((x, y), batch_size=batch_size)
    keras_history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                              callbacks=[tracker], **fit_kwargs)
    return load_history(tracker.run_id), keras_history


def check_against_hand_computation(logged, model, x, y):
    """The logged diagnosis equals the rule applied to the logged parts with a
    standard error recomputed from numpy per-sample losses."""
    probe_size = int(logged.tags["gaptrack.probe_size"])
    d = diagnose(logged.records, probe_size=probe_size)
    losses = per_sample_losses(model, x, y)
    se = losses.std(ddof=1) / np.sqrt(len(losses))
    assert d.noise == pytest.approx(se, rel=1e-4)
    assert probe_size == len(x)
    last = logged.measured[-1].parts["loss"]
    parts = {p: getattr(last, p) for p in PARTS}
    magnitudes = [abs(last.gap), *map(abs, parts.values())]
    expected = "none" if max(magnitudes) <= se else max(parts, key=lambda p: abs(parts[p]))
    assert d.cause == expected
    assert logged.tags["gaptrack.diagnosis"] == expected  # what the tracker tagged
    return d, se


def test_textbook_cases(sqlite_uri):
    # one batch per epoch, no Dropout/BN: the gap is all drift, the loss before the update
    keras.utils.set_random_seed(0)
    x, y = blobs(32)
    model = mlp(l2=0.01)
    before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    logged, _ = track(model, x, y, 32, 1)
    d, se = check_against_hand_computation(logged, model, x, y)
    assert d.cause == "drift" and d.fit == pytest.approx(before, rel=1e-6)
    assert d.parts["mode"] == d.parts["bn_ema"] == 0 and abs(d.gap) > 2 * se

    # Dropout 0.5: training mode is much worse than inference
    keras.utils.set_random_seed(0)
    x, y = blobs(512)
    model = mlp(dropout=0.5, width=64, lr=1e-3)
    logged, _ = track(model, x, y, 32, 3)
    d, se = check_against_hand_computation(logged, model, x, y)
    assert d.cause == "mode" and d.parts["bn_ema"] == 0 and abs(d.parts["mode"]) > 2 * se

    # BN on raw (unstandardised) inputs after 2 steps: the moving averages are
    # still near their initial 0 and 1
    keras.utils.set_random_seed(0)
    x, y = blobs(256)
    x = 3 * x + 5
    model = mlp(bn=True, lr=1e-3)
    logged, _ = track(model, x, y, 128, 1)
    d, se = check_against_hand_computation(logged, model, x, y)
    assert d.cause == "bn_ema" and abs(d.parts["bn_ema"]) > 2 * se
    assert d.parts["bn_ema"] < 0  # evaluate() is the worse of the two


def test_converged_model_without_dropout_or_bn_is_none(sqlite_uri):
    """No Dropout/BN: mode = bn_ema = 0 and the gap is the drift of one
    full-batch step, which vanishes at convergence, far below the noise of a
    loss that does not (20% of the labels are noise)."""
    keras.utils.set_random_seed(0)
    x, y = blobs(256, seed=3)
    rng = np.random.default_rng(1)
    noisy = rng.random(len(y)) < 0.2
    y[noisy] = rng.integers(0, 3, noisy.sum())
    model = mlp(lr=1e-2)
    # 150 full-batch steps in one fit() call (one epoch of the data repeated)
    model.fit(np.tile(x, (150, 1)), np.tile(y, 150), batch_size=len(x), shuffle=False, verbose=0)
    logged, _ = track(model, x, y, len(x), 2)
    d, se = check_against_hand_computation(logged, model, x, y)
    assert d.cause == "none"
    assert d.parts["mode"] == d.parts["bn_ema"] == 0 and abs(d.gap) < se / 4


def test_diverging_run_is_nonfinite_from_its_first_nan_epoch(sqlite_uri):
    """SGD with a learning rate of 10: a finite first epoch, then NaN. The first
    non-finite epoch, computed independently from History and evaluate() at
    each epoch end, is tagged, and the report says so."""
    keras.utils.set_random_seed(0)
    x, y = blobs(64)
    model = mlp()
    model.compile(keras.optimizers.SGD(10.0), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    evaluated = []

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            evaluated.append(self.model.evaluate(x, y, verbose=0, return_dict=True)["loss"])

    tracker = gaptrack.GapTracker((x, y), batch_size=16)
    keras_history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                              callbacks=[tracker, Evaluate()])
    fit = keras_history.history["loss"]
    first = min(e for e in range(3) if not (math.isfinite(fit[e]) and math.isfinite(evaluated[e])))
    assert first > 0 and not math.isfinite(fit[-1])  # finite at first, then diverged
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"  # recorded, not crashed
    assert run.data.tags["gaptrack.diagnosis"] == "nonfinite"
    assert run.data.tags["gaptrack.nonfinite_epoch"] == str(first)
    logged = {p.step: p.value for p in client.get_metric_history(tracker.run_id, "fit/loss")}
    assert [math.isnan(logged[e]) for e in range(3)] == [math.isnan(v) for v in fit]
    d = diagnose(load_history(tracker.run_id).records)
    assert (d.cause, d.first_nonfinite_epoch) == ("nonfinite", first)
    text = mlflow.artifacts.load_text(f"runs:/{tracker.run_id}/{REPORT_DIR}/report.md")
    assert f"became non-finite (NaN or inf) at epoch {first}" in text
