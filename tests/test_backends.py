"""gaptrack on the other Keras backends, JAX and PyTorch.

The contract modules (``conftest.CONTRACT_MODULES``) run on each in a pytest
subprocess, and ``tests/no_tensorflow.py`` in one of its own, all started in the
background when the session starts (see ``conftest.py``); their tests here wait
for them, at the end of the session.
"""

import json
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
    _finished(run)
    properties, cases = junit_results(run.junit)
    assert properties.get("keras_backend") == backend
    passed = [name for name, outcome, _ in cases if outcome == "passed"]
    assert len(cases) >= MIN_COLLECTED, [name for name, *_ in cases]
    assert len(passed) >= 0.9 * len(cases), cases
    skips = [(name, message) for name, outcome, message in cases if outcome == "skipped"]
    assert all(message.startswith("TensorFlow only") for _, message in skips), skips
    assert not [case for case in cases if case[1] in ("failure", "error")]


def _finished(run):
    """Wait for ``run`` to end; assert that it succeeded."""
    code = run.wait(RUN_TIMEOUT)
    ended = (f"did not end within {RUN_TIMEOUT} s" if code is None
             else f"ended with exit code {code}")
    assert code == 0, (f"the {run.kind} run on {run.backend} {ended} ({run.log}):\n"
                       f"{run.output_tail()}")


@pytest.mark.parametrize("backend", conftest.OTHER_BACKENDS)
def test_no_tensorflow_import_on_backend(backend):
    """On JAX and PyTorch gaptrack's whole path (tracker, measure, recalibrate_bn,
    snapshots, autolog) runs without importing TensorFlow: ``tests/no_tensorflow.py``,
    started in the background at session start."""
    run = conftest.backend_run(backend, conftest.NO_TENSORFLOW)
    _finished(run)
    out = json.loads(run.out.read_text())
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
