"""gaptrack on the other Keras backends, JAX and PyTorch.

The contract modules (``conftest.CONTRACT_MODULES``) run on each in a pytest
subprocess, started in the background when the session starts (see
``conftest.py``); their tests here wait for them, at the end of the session.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import keras
import numpy as np
import pytest

import conftest

#: Seconds a test waits for its backend's run to end.
RUN_TIMEOUT = 1800
#: Fewest tests a run must collect (the contract modules hold 47 that are not
#: ``backend_independent``): a run that finds few tests has lost some.
MIN_COLLECTED = 40


def junit_results(path):
    """``(properties, [(test id, outcome, message)])`` of a JUnit XML file; the
    outcome is ``passed``, ``skipped``, ``failure`` or ``error``."""
    root = ElementTree.parse(path).getroot()
    properties, cases = {}, []
    for suite in root.iter("testsuite"):
        for prop in suite.iter("property"):
            properties[prop.get("name")] = prop.get("value")
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome, message = tag, found.get("message") or ""
                    break
            cases.append((name, outcome, message))
    return properties, cases


@pytest.mark.parametrize("backend", conftest.OTHER_BACKENDS)
def test_the_contract_tests_pass_on_backend(backend):
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"the contract runs on the other backends start from a session on "
                    f"TensorFlow only (this one runs on {keras.backend.backend()})")
    run = conftest.backend_run(backend)
    code = run.wait(RUN_TIMEOUT)
    ended = (f"did not end within {RUN_TIMEOUT} s" if code is None
             else f"ended with exit code {code}")
    assert code == 0, f"the contract tests on {backend} {ended} ({run.log}):\n{run.output_tail()}"
    properties, cases = junit_results(run.junit)
    assert properties.get("keras_backend") == backend
    passed = [name for name, outcome, _ in cases if outcome == "passed"]
    assert len(cases) >= MIN_COLLECTED, [name for name, *_ in cases]
    assert len(passed) >= 0.9 * len(cases), cases
    skips = [(name, message) for name, outcome, message in cases if outcome == "skipped"]
    assert all(message.startswith("TensorFlow only") for _, message in skips), skips
    assert not [case for case in cases if case[1] in ("failure", "error")]


#: Trains, measures, recalibrates and autologs a small BN + Dropout model, and
#: prints what it logged and whether TensorFlow was imported. No
#: keras.utils.set_random_seed: it imports TensorFlow when it is installed.
NO_TENSORFLOW = r"""
import json
import sys

import mlflow
import numpy as np

import gaptrack
import keras
from mlflow.tracking import MlflowClient

sys.path.insert(0, sys.argv[2])
from builders import blobs

mlflow.set_tracking_uri(sys.argv[1])
x, y = blobs(96)
model = keras.Sequential([
    keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
    keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, seed=1),
    keras.layers.Dense(3, activation="softmax"),
])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
probe = (x, y)
tracker = gaptrack.GapTracker(probe, batch_size=16)
model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
moving_mean = model.get_layer("bn").moving_mean.numpy().astype(np.float64).tolist()
measured = gaptrack.measure(model, probe, batch_size=16)
table = gaptrack.recalibrate_bn(model, probe, batch_size=16)
recalibrated = model.evaluate(x, y, verbose=0, return_dict=True)
snapshots = gaptrack.load_bn_snapshots(tracker.run_id)
last = snapshots[snapshots.epoch == snapshots.epoch.max()].sort_values("channel")
logged = {p.step: p.value
          for p in MlflowClient().get_metric_history(tracker.run_id, "eval_train/loss")}
gaptrack.autolog()
with mlflow.start_run() as run:
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
autologged = MlflowClient().get_run(run.info.run_id).data.metrics
after = model.evaluate(x, y, verbose=0, return_dict=True)
print(json.dumps({
    "tensorflow_imported": "tensorflow" in sys.modules,
    "backend": keras.backend.backend(),
    "logged_eval_train_loss": logged[max(logged)],
    "logged_epochs": sorted(logged),
    "evaluate": evaluated,
    "measured_eval_train": measured.eval_train,
    "measured_precise_bn": measured.precise_bn,
    "recalibrated": recalibrated,
    "recalibrated_layers": table.recalibrated.tolist(),
    "snapshot_epoch": int(last.epoch.max()),
    "snapshot_layers": sorted(last.layer.unique()),
    "snapshot_moving_mean": last.moving_mean.tolist(),
    "moving_mean": moving_mean,
    "autologged_eval_train_loss": autologged.get("eval_train/loss"),
    "evaluate_after_autologged_fit": after,
}))
"""


@pytest.mark.parametrize("backend", conftest.OTHER_BACKENDS)
def test_no_tensorflow_import_on_backend(backend, tmp_path):
    """On JAX and PyTorch gaptrack's whole path (tracker, measure, recalibrate_bn,
    snapshots, autolog) runs without importing TensorFlow."""
    done = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, f"sqlite:///{tmp_path / 'mlflow.db'}",
         str(conftest.REPO / "tests")],
        cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": backend},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["backend"] == backend
    assert out["tensorflow_imported"] is False
    assert out["logged_epochs"] == [0, 1]
    assert out["logged_eval_train_loss"] == pytest.approx(out["evaluate"]["loss"], rel=1e-5)
    for name, value in out["evaluate"].items():
        assert out["measured_eval_train"][name] == pytest.approx(value, rel=1e-5), name
        assert out["recalibrated"][name] == pytest.approx(out["measured_precise_bn"][name],
                                                          rel=1e-5), name
    assert out["recalibrated_layers"] == [True]
    assert out["snapshot_epoch"] == 1 and out["snapshot_layers"] == ["bn"]
    np.testing.assert_array_equal(out["snapshot_moving_mean"], out["moving_mean"])
    assert out["autologged_eval_train_loss"] == pytest.approx(
        out["evaluate_after_autologged_fit"]["loss"], rel=1e-5)
