"""gaptrack.explain: the last epoch decomposed exactly as the tracker does it,
what can be said without a History, and bad input refused before any pass."""

import math
import re

import keras
import numpy as np
import pytest

import gaptrack
from builders import blobs, mlp
from gaptrack.explaining import ExplainError
from gaptrack.keys import PARTS
from gaptrack.measurement import Measurer


@pytest.fixture(scope="module")
def trained():
    """A BN + Dropout model fit 3 epochs with an in-memory tracker beside it."""
    keras.utils.set_random_seed(0)
    x, y = blobs(192)
    model = mlp(bn=True, dropout=0.2)
    tracker = gaptrack.GapTracker((x, y), batch_size=64, mlflow=False)
    history = model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[tracker])
    return model, x, y, history, tracker


def test_with_a_history_it_is_the_trackers_last_epoch(trained):
    model, x, y, history, tracker = trained
    report = gaptrack.explain(model, (x, y), batch_size=64, history=history)
    frame, tracked = report.to_frame(), tracker.report().to_frame()
    assert list(frame.index) == ["loss", "accuracy"]
    assert list(frame.columns) == ["fit", "train_mode", "precise_bn", "eval_train", "gap",
                                   "drift", "mode", "bn_ema", "noise"]
    np.testing.assert_allclose(frame.to_numpy(), tracked.to_numpy(), rtol=0, atol=1e-9)
    assert report.sentence == tracker.report().sentence
    assert report.remedy == tracker.report().remedy
    # independent of gaptrack: what fit() reported and what evaluate() says
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    for m in frame.index:
        row = frame.loc[m]
        assert row["fit"] == history.history[m][-1]
        assert row["eval_train"] == pytest.approx(evaluated[m], abs=1e-6)
        assert row["gap"] == row["fit"] - row["eval_train"]
        assert row[list(PARTS)].sum() == pytest.approx(row["gap"], abs=1e-12)
        assert row["mode"] == row["train_mode"] - row["precise_bn"]
        assert row["bn_ema"] == row["precise_bn"] - row["eval_train"]
    # the same forms of a history give the same report: its dict, one epoch's logs
    by_dict = gaptrack.explain(model, (x, y), batch_size=64, history=history.history)
    assert by_dict.to_frame().equals(frame) and by_dict.sentence == report.sentence
    logs = {k: v[-1] for k, v in history.history.items()}
    by_logs = gaptrack.explain(model, (x, y), batch_size=64, history=logs)
    assert by_logs.to_frame().equals(frame)
    assert by_logs.sentence.startswith("After fit(), fit() reported loss")
    assert report.sentence.startswith("At epoch 2, fit() reported loss")


def test_without_a_history_it_says_what_the_weights_tell(trained):
    model, x, y, _, _ = trained
    report = gaptrack.explain(model, (x, y), batch_size=64)
    frame = report.to_frame()
    measured = gaptrack.measure(model, (x, y), batch_size=64)
    for m in frame.index:
        row = frame.loc[m]
        assert math.isnan(row["fit"]) and math.isnan(row["gap"]) and math.isnan(row["drift"])
        assert row["train_mode"] == measured.train_mode[m]
        assert row["mode"] == measured.train_mode[m] - measured.precise_bn[m]
        assert row["bn_ema"] == measured.precise_bn[m] - measured.eval_train[m]
    parts = frame.loc["loss", ["mode", "bn_ema"]]
    assert report.evidence.noise == frame.loc["loss", "noise"]
    within = parts.abs().max() <= report.evidence.threshold  # z standard errors
    assert report.diagnosis == ("none" if within else parts.abs().idxmax())
    s = report.sentence
    assert s.startswith("Without fit()'s own numbers (pass history= to measure drift too)")
    assert f"the loss is {frame.loc['loss', 'train_mode']:.4g}" in s
    text = str(report).splitlines()
    [row] = [line.split() for line in text if line.strip().startswith("loss ")]
    assert row[1] == "-" and row[5] == "-" and row[6] == "-"  # fit, gap and drift


def test_a_model_without_bn_or_dropout_is_drift_or_nothing():
    keras.utils.set_random_seed(1)
    x, y = blobs(128)
    model = mlp()
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    frame = gaptrack.explain(model, (x, y), batch_size=16, history=history).to_frame()
    assert (frame["mode"].abs() < 1e-6).all() and (frame["bn_ema"] == 0).all()
    assert frame["precise_bn"].isna().all()
    assert frame.loc["loss", "drift"] == pytest.approx(
        history.history["loss"][-1] - model.evaluate(x, y, verbose=0)[0], abs=1e-6)


@pytest.fixture
def no_pass(monkeypatch):
    """Any measurement fails the test: bad input is refused before the passes."""
    def measured(*args, **kwargs):
        raise AssertionError("a pass ran before the bad input was refused")
    monkeypatch.setattr(Measurer, "measure", measured)


@pytest.mark.parametrize("batch_size", [0, -32, 32.0, "32", True, None])
def test_a_batch_size_that_is_not_a_positive_integer(trained, batch_size, no_pass):
    model, x, y, history, _ = trained
    with pytest.raises(ExplainError, match=re.escape(
            f"batch_size must be a positive integer, got {batch_size!r}")):
        gaptrack.explain(model, (x, y), batch_size=batch_size, history=history)


def test_another_models_history_is_refused(trained, no_pass):
    model, x, y, _, _ = trained
    other = mlp(metrics=())
    other_history = other.fit(x, y, batch_size=64, epochs=1, verbose=0)
    with pytest.raises(ExplainError, match="History of model .*, not of model"):
        gaptrack.explain(model, (x, y), batch_size=64, history=other_history)
    # its dict does not carry the model: the metrics it lacks name it
    with pytest.raises(ExplainError, match=re.escape(
            "history holds ['loss'], but model") + ".* reports \\['loss', 'accuracy'\\] "
            "\\(missing: \\['accuracy'\\]\\)"):
        gaptrack.explain(model, (x, y), batch_size=64, history=other_history.history)


@pytest.mark.parametrize("history, message", [
    ([0.5, 0.4], "history must be a keras.callbacks.History .*; got list"),
    ({}, "history must be .*; got dict {}"),
    ({"loss": [], "accuracy": []}, re.escape("history['loss'] is empty: fit() ran no epoch")),
    ({"loss": "low", "accuracy": 1.0}, "history\\['loss'\\] must be a number or a list"),
])
def test_a_history_of_no_accepted_form(trained, history, message, no_pass):
    model, x, y, _, _ = trained
    with pytest.raises(ExplainError, match=message):
        gaptrack.explain(model, (x, y), batch_size=64, history=history)


def test_data_of_the_wrong_shape_is_named(trained, no_pass):
    model, x, y, history, _ = trained
    with pytest.raises(ExplainError, match=re.escape(
            "data's samples have shape (4,), but model") + ".* inputs of shape \\(6,\\)"):
        gaptrack.explain(model, (x[:, :4], y), batch_size=64, history=history)
