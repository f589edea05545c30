"""Tests of gaptrack.decompose against the SPEC's definitions, computed with numpy.

SPEC: ``gap = fit - eval_train``, ``drift = fit - train_mode``, ``mode =
train_mode - precise_bn`` (``- eval_train`` without BN), ``bn_ema = precise_bn -
eval_train`` (0 without BN), and ``drift + mode + bn_ema == gap`` up to rounding.
"""

import doctest
import math

import numpy as np
import pytest

from gaptrack import decompose as decompose_module
from gaptrack.decompose import decompose as decompose_parts
from gaptrack.decompose import summarize
from gaptrack.keys import PARTS
from gaptrack.record import EpochRecord, Parts


def decompose(*sides):
    """:func:`gaptrack.decompose.decompose` flattened to ``gap/<m>[/<part>]`` names."""
    out = {}
    for m, parts in decompose_parts(*sides).items():
        out[f"gap/{m}"] = parts.gap
        out.update((f"gap/{m}/{p}", getattr(parts, p)) for p in PARTS)
    return out


def records(history):
    """EpochRecords holding ``{metric: [gap per epoch]}`` (parts: drift = gap)."""
    steps = max((len(g) for g in history.values()), default=0)
    return [EpochRecord(step, parts={m: Parts(g[step], g[step], 0.0, 0.0)
                                     for m, g in history.items() if step < len(g)})
            for step in range(steps)]

METRICS = ["loss", "accuracy", "out/auc"]


def spec_parts(fit, eval_train, train_mode, precise_bn=None):
    """The SPEC table, vectorised over metrics with numpy."""
    f, e, t = (np.array([d[m] for m in METRICS], dtype=np.float64)
               for d in (fit, eval_train, train_mode))
    p = e if precise_bn is None else np.array([precise_bn[m] for m in METRICS], np.float64)
    columns = {"": f - e, "/drift": f - t, "/mode": t - p, "/bn_ema": p - e}
    return {f"gap/{m}{suffix}": float(col[i])
            for suffix, col in columns.items() for i, m in enumerate(METRICS)}


def random_sides(rng, n_sides):
    return [{m: float(v) for m, v in zip(METRICS, rng.uniform(0, 2, size=len(METRICS)))}
            for _ in range(n_sides)]


def test_decompose_with_precise_bn_matches_the_spec():
    fit, eval_train, train_mode, precise_bn = random_sides(np.random.default_rng(0), 4)
    out = decompose(fit, eval_train, train_mode, precise_bn)
    expected = spec_parts(fit, eval_train, train_mode, precise_bn)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-15, abs=1e-15), key


def test_decompose_without_precise_bn_has_no_bn_ema():
    fit, eval_train, train_mode = random_sides(np.random.default_rng(1), 3)
    for precise_bn in (None, {}):
        out = decompose(fit, eval_train, train_mode, precise_bn)
        expected = spec_parts(fit, eval_train, train_mode)
        assert set(out) == set(expected)
        for m in METRICS:
            assert out[f"gap/{m}/bn_ema"] == 0.0
            assert out[f"gap/{m}/mode"] == pytest.approx(train_mode[m] - eval_train[m], abs=1e-15)
            assert out[f"gap/{m}"] == pytest.approx(fit[m] - eval_train[m], abs=1e-15)
            assert out[f"gap/{m}/drift"] == pytest.approx(fit[m] - train_mode[m], abs=1e-15)


def test_hand_computed_values():
    # Dyadic numbers: every difference is exact in binary floating point.
    out = decompose({"loss": 0.5, "acc": 0.75}, {"loss": 0.875, "acc": 0.5},
                    {"loss": 0.625, "acc": 0.625}, {"loss": 0.75, "acc": 0.5625})
    assert out == {
        "gap/loss": 0.5 - 0.875, "gap/loss/drift": 0.5 - 0.625,
        "gap/loss/mode": 0.625 - 0.75, "gap/loss/bn_ema": 0.75 - 0.875,
        "gap/acc": 0.75 - 0.5, "gap/acc/drift": 0.75 - 0.625,
        "gap/acc/mode": 0.625 - 0.5625, "gap/acc/bn_ema": 0.5625 - 0.5,
    }


def test_metrics_missing_on_one_side_and_validation_keys_are_skipped():
    fit = {"loss": 1.0, "acc": 0.5, "only_fit": 3.0, "val_loss": 9.0, "val_acc": 0.1,
           "no_train_mode": 1.0}
    eval_train = {"loss": 1.5, "acc": 0.25, "only_eval": 2.0, "no_train_mode": 0.5}
    train_mode = {"loss": 1.25, "acc": 0.375, "only_eval": 2.0}
    out = decompose(fit, eval_train, train_mode)
    assert set(out) == {f"gap/{m}{s}" for m in ("loss", "acc")
                        for s in ("", "/drift", "/mode", "/bn_ema")}


def test_values_are_python_floats_even_from_numpy_scalars():
    fit = {"loss": np.float32(0.1)}
    eval_train = {"loss": np.float32(0.3)}
    train_mode = {"loss": np.float32(0.2)}
    precise_bn = {"loss": np.float32(0.7)}
    for out in (decompose(fit, eval_train, train_mode, precise_bn),
                decompose(fit, eval_train, train_mode)):
        assert all(type(v) is float for v in out.values()), {k: type(v) for k, v in out.items()}
        parts = sum(out[f"gap/loss/{p}"] for p in PARTS)
        assert parts == pytest.approx(out["gap/loss"], rel=1e-12)
    f, e = float(np.float32(0.1)), float(np.float32(0.3))
    assert decompose(fit, eval_train, train_mode)["gap/loss"] == f - e


@pytest.mark.parametrize("with_bn", [True, False])
def test_parts_telescope_to_the_gap_for_random_inputs(with_bn):
    rng = np.random.default_rng(2 + with_bn)
    for _ in range(2000):
        # Magnitudes from 1e-12 to 1e12, mixed within one draw, either sign.
        values = rng.choice([-1, 1], size=4) * 10.0 ** rng.uniform(-12, 12, size=4)
        if rng.uniform() < 0.3:
            values[:] = values[0] * (1 + rng.normal(scale=1e-9, size=4))  # near-cancellation
        f, e, t, p = (float(v) for v in values)
        out = decompose({"m": f}, {"m": e}, {"m": t}, {"m": p} if with_bn else None)
        scale = max(abs(f), abs(e), abs(t), abs(p) if with_bn else 0.0)
        total = out["gap/m/drift"] + out["gap/m/mode"] + out["gap/m/bn_ema"]
        assert abs(total - out["gap/m"]) <= 1e-12 * scale, (f, e, t, p)
        assert abs(out["gap/m"] - (f - e)) <= 1e-15 * scale


def test_docstring_examples():
    failures, tried = doctest.testmod(decompose_module)
    assert tried >= 2 and failures == 0


# -- summarize -----------------------------------------------------------------------


def test_summarize_matches_numpy():
    rng = np.random.default_rng(4)
    history = {"loss": list(rng.normal(size=7)), "out/auc": list(rng.normal(size=1) * 1e-6),
               "acc": list(rng.normal(size=30) * 1e3)}
    out = summarize(records(history))
    assert set(out) == set(history)
    for m, gaps in history.items():
        g = np.array(gaps)
        assert set(out[m]) == {"final", "max_abs", "mean_abs"}
        assert out[m]["final"] == g[-1]
        assert out[m]["max_abs"] == np.max(np.abs(g))
        assert out[m]["mean_abs"] == pytest.approx(np.mean(np.abs(g)), rel=1e-13)


def test_summarize_skips_non_finite_gaps_but_reports_the_final_one():
    history = {"a": [0.5, math.nan, -2.0, math.inf, 1.0],
               "b": [-0.25, 3.0, -math.inf, math.nan],
               "c": [math.nan, math.nan],
               "empty": []}
    out = summarize(records(history))
    assert "empty" not in out
    for m in ("a", "b"):
        g = np.array(history[m])
        finite = np.abs(g[np.isfinite(g)])
        assert out[m]["max_abs"] == np.max(finite)
        assert out[m]["mean_abs"] == pytest.approx(np.mean(finite), rel=1e-15)
    assert out["a"]["final"] == 1.0
    assert math.isnan(out["b"]["final"])
    assert math.isnan(out["c"]["final"])
    assert math.isnan(out["c"]["max_abs"]) and math.isnan(out["c"]["mean_abs"])
