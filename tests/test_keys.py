"""The key namespace: records to keys and back, the UI's sections, and that no
other module of the package writes a key."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.utils.validation import _validate_metric_name

from gaptrack import keys
from gaptrack.decompose import decompose
from gaptrack.record import EpochRecord, Parts

PACKAGE = Path(keys.__file__).parent


def test_parts_are_the_record_fields():
    assert keys.PARTS == tuple(f.name for f in dataclasses.fields(Parts))[1:]


def test_records_round_trip_through_the_keys():
    # names with '/', names ending in a part's word, names that are a part's word
    names = ["loss", "out/accuracy", "loss_drift", "xmode", "drift", "out/drift", "bn_ema"]
    rng = np.random.default_rng(5)
    records = []
    for step in range(4):
        present = names if step != 2 else [m for m in names if m != "xmode"]
        f, e, t, p = ({m: float(v) for m, v in zip(present, rng.normal(size=len(present)))}
                      for _ in range(4))
        records.append(EpochRecord(
            step, fit=f, val={"loss": 0.5}, eval_train=e, train_mode=t, precise_bn=p,
            parts=decompose(f, e, t, p), noise=0.01 * step,
            staleness={"block.bn": (0.1 * step, 0.2), "head_bn": (0.3, 0.4 + step)}))
    records.append(EpochRecord(4, fit={"loss": 0.25}))  # an epoch not measured
    metrics = {}
    for record in records:
        for key, value in keys.epoch_metrics(record).items():
            metrics.setdefault(key, {})[record.step] = value
    assert keys.measured_metrics(metrics) == sorted(names, key=lambda m: (m != "loss", m))
    parsed = keys.parse_records({k: metrics[k] for k in keys.history_keys(metrics)})
    assert parsed == records
    assert [r.step for r in parsed if "xmode" in r.parts] == [0, 1, 3]


def test_summary_keys_and_the_sections_the_ui_shows():
    summaries = {"loss": {"final": -0.5, "max_abs": 0.5, "mean_abs": 0.25}}
    out = keys.summary_metrics(summaries, worst_staleness=(1.5, 0.75))
    assert out == {"gap_final/loss": -0.5, "gap_max_abs/loss": 0.5, "gap_mean_abs/loss": 0.25,
                   "staleness/worst/mean": 1.5, "staleness/worst/var": 0.75}
    # 20 BN layers: two sections, sorted after gap (the UI sorts by the part
    # before the last '/')
    record = EpochRecord(0, fit={"loss": 1.0}, eval_train={"loss": 1.0},
                         parts={"loss": Parts(0.0, 0.0, 0.0, 0.0)},
                         staleness={f"block.batch_normalization_{i}": (0.0, 0.0)
                                    for i in range(20)})
    sections = sorted({k.rpartition("/")[0] for k in keys.epoch_metrics(record)})
    assert sections == ["eval_train", "fit", "gap", "gap/loss", "staleness/mean",
                        "staleness/var"]


@pytest.mark.parametrize("path, expected", [
    ("bn", "bn"), ("outer/inner/bn", "outer.inner.bn"), ("a b/c*d", "a b.c_d"),
    ("./../x", "x"), ("features:2/block1_bn", "features:2.block1_bn"),
])
def test_layer_keys_are_valid_and_unique(path, expected):
    taken = set()
    key = keys.layer_key(path, taken)
    assert key == expected
    assert keys.layer_key(path, taken) == f"{expected}:2"
    for stat in keys.STALENESS_STATS:
        _validate_metric_name(keys.staleness_key(stat, key))


def test_no_other_module_writes_a_key():
    written = re.compile(r"""["'](fit|val|eval_train|train_mode|precise_bn|returned|gap|gap_final"""
                         r"""|gap_max_abs|gap_mean_abs|noise|staleness|replicas|bn)/"""
                         r"""|["']gaptrack\.(?!MODULES)[a-z_]+["']|["']mlflow\.note"""
                         .replace("MODULES", "|".join(p.stem + "[\"']"
                                                      for p in PACKAGE.glob("*.py"))))
    offenders = [f"{path.name}:{n}: {line.strip()}"
                 for path in sorted(PACKAGE.glob("*.py")) if path.name != "keys.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if written.search(line) and not line.lstrip().startswith(("#", ">>>", "..."))]
    assert offenders == []


def test_nan_values_round_trip():
    record = EpochRecord(0, fit={"loss": math.nan}, eval_train={"loss": math.nan},
                         parts={"loss": Parts(math.nan, math.nan, 0.0, 0.0)})
    metrics = {k: {0: v} for k, v in keys.epoch_metrics(record).items()}
    (parsed,) = keys.parse_records(metrics)
    assert math.isnan(parsed.fit["loss"]) and math.isnan(parsed.parts["loss"].gap)
