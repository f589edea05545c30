"""The tutorial notebook (docs/tutorials/explain.ipynb), run in a real Jupyter
kernel: its outputs' numbers against ``model.evaluate`` and ``History``."""

import base64
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorials" / "explain.ipynb"

#: Run in the notebook's kernel after its cells: each case's report against an
#: evaluate() and the History computed there, apart from gaptrack.
CHECK = """
import json, math
out = []
for (bn, batch_size), (model, history, report) in cases.items():
    frame = report.to_frame()
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    out.append({"bn": bn, "batch_size": batch_size, "diagnosis": report.diagnosis,
                "sentence": report.sentence,
                "frame": frame.to_dict(orient="index"),
                "evaluate": {k: float(v) for k, v in evaluated.items()},
                "history": {k: float(v[-1]) for k, v in history.history.items()}})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))
    cwd = tmp_path_factory.mktemp("notebook")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb, cwd


def outputs(cell, kind):
    return [o for o in cell.outputs if o.output_type == kind]


def test_the_notebook_runs_and_its_reports_are_evaluate_and_history(executed):
    nb, cwd = executed
    [stream] = outputs(nb.cells[-1], "stream")
    cases = json.loads(stream.text)
    assert {(c["bn"], c["batch_size"]) for c in cases} == {
        (False, 32), (False, 1024), (True, 32), (True, 1024)}
    for case in cases:
        for metric, row in case["frame"].items():
            assert row["eval_train"] == pytest.approx(case["evaluate"][metric], abs=1e-5)
            assert row["fit"] == pytest.approx(case["history"][metric], abs=1e-7)
            assert row["gap"] == pytest.approx(row["fit"] - row["eval_train"], abs=1e-5)
            parts = row["drift"] + row["mode"] + row["bn_ema"]
            assert parts == pytest.approx(row["gap"], abs=1e-9)
            if not case["bn"]:
                assert row["bn_ema"] == 0 and row["precise_bn"] != row["precise_bn"]  # NaN
        # the diagnosis: the loss's largest part, unless all are within 1 SE
        loss = case["frame"]["loss"]
        parts = {p: abs(loss[p]) for p in ("drift", "mode", "bn_ema")}
        within = max(abs(loss["gap"]), *parts.values()) <= loss["noise"]
        assert case["diagnosis"] == ("none" if within else max(parts, key=parts.get))
    # the seed case: stale moving averages at 1024 with BN
    by_case = {(c["bn"], c["batch_size"]): c for c in cases}
    assert by_case[True, 1024]["diagnosis"] == "bn_ema"
    assert not list(cwd.iterdir())  # no MLflow store, no spool: nothing written


def test_the_notebook_displays_the_reports(executed):
    nb, _ = executed
    html_outputs = [o for cell in nb.cells if cell.cell_type == "code"
                    for o in outputs(cell, "execute_result") if "text/html" in o.data]
    reports = [o for o in html_outputs if 'class="gaptrack-report"' in o.data["text/html"]]
    assert len(reports) == 3  # the first report, one of the four cases, one without history
    for output in reports:
        page = output.data["text/html"]
        assert "What to do:" in page and "<table" in page
        png = page.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
        assert base64.b64decode(png).startswith(b"\x89PNG\r\n\x1a\n")
        # the text/plain of the same output is the terminal report, not a repr
        assert output.data["text/plain"].startswith("gaptrack diagnosis: ")
    without_history = reports[-1].data["text/plain"]
    assert "Without fit()'s own numbers" in without_history
    # recalibrate_bn made evaluate() what precise_bn predicted
    [recalibrated] = [cell for cell in nb.cells if "recalibrate_bn(model" in cell.source]
    lines = outputs(recalibrated, "stream")[0].text.splitlines()
    after, predicted = ([float(v) for v in line.split(":")[1].split()] for line in lines)
    assert after == pytest.approx(predicted, abs=2e-4)
