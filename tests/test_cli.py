"""Tests for the ``gaptrack compare`` command, through click's CliRunner and as a
real subprocess, against a SQLite store and the session's HTTP server.

The runs and the independent ranking (from each run's logged ``gap/<m>``
history) come from ``test_compare``.
"""

import io
import json
import os
import re
import subprocess
import sys
import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, free_port
from mlflow.tracking import MlflowClient

from gaptrack.cli import main
from tables import decimals, read_table
from test_compare import expected_order, fill, log_run, uri  # noqa: F401  (uri: fixture)


@pytest.fixture
def store(uri):  # noqa: F811
    return fill(uri)


def ids_by_name(store):
    return {r.info.run_name: r.info.run_id for r in store.client.search_runs([store.experiment_id])}


def compare(*args, env=None):
    """``gaptrack compare ARGS`` through CliRunner."""
    return CliRunner(env=env).invoke(main, ["compare", *args])


def test_formats_give_the_ranking(store):
    expected = expected_order(store.client, store.tracked, "accuracy", "max_abs")
    common = ["-e", store.name, "-m", "accuracy", "--by", "max_abs", "--tracking-uri", store.uri]

    result = compare(*common, "-f", "csv")
    assert result.exit_code == 0, result.output
    csv = pd.read_csv(io.StringIO(result.stdout))
    assert list(csv.run_id) == expected
    assert list(csv["rank"]) == list(range(1, 8))
    for row in csv.itertuples():
        gap = store.series[row.run_id]["gap/accuracy"]
        assert row.gap_max_abs == pytest.approx(np.max(np.abs(gap)))
        assert row.fit == pytest.approx(store.series[row.run_id]["fit/accuracy"][-1])
    assert "note: 2 runs matching the filter were not tracked" in result.stderr

    records = json.loads(compare(*common, "--format", "json").stdout)
    assert [r["run_id"] for r in records] == expected
    assert records[0]["gap_max_abs"] == pytest.approx(csv.gap_max_abs[0])

    columns, rows = read_table(compare(*common, "--columns", "run_id",
                                       env={"COLUMNS": "200"}).stdout)
    assert columns == ["rank", "run_name", "fit", "eval_train", "gap", "gap_max_abs", "drift",
                       "mode", "bn_ema", "diagnosis", "run_id"]
    assert [row[-1] for row in rows] == expected
    assert [int(row[0]) for row in rows] == list(range(1, 8))

    markdown = compare(*common, "-f", "markdown").stdout.splitlines()
    assert markdown[0].startswith("| rank | run_id | run_name |")
    assert set(markdown[1].split()) == {"|", "---"}
    assert [line.split(" | ")[1] for line in markdown[2:]] == expected


def test_top_k_filter_and_output_file(store, tmp_path):
    sgd = expected_order(store.client, store.sgd, "loss", "final")
    for name, parse in (("out.csv", pd.read_csv), ("out.json", pd.read_json),
                        ("out.md", lambda p: [l.split(" | ")[1] for l in open(p)][2:]),
                        ("out.txt", lambda p: [ids_by_name(store)[row[1]]
                                               for row in read_table(open(p).read())[1]])):
        result = compare("-e", store.name, "--filter", "params.optimizer = 'sgd'", "-k", "2",
                         "-o", str(tmp_path / name), "--tracking-uri", store.uri)
        assert result.exit_code == 0, result.output
        assert result.stdout == ""
        assert f"wrote 2 runs to {tmp_path / name}" in result.stderr
        parsed = parse(tmp_path / name)
        ids = list(parsed.run_id) if isinstance(parsed, pd.DataFrame) else parsed
        assert ids == sgd[:2], name


def test_tracking_uri_from_environment(store, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # not the store
    result = compare("-e", store.name, "-f", "csv", env={"MLFLOW_TRACKING_URI": store.uri})
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(io.StringIO(result.stdout)).run_id) == set(store.tracked)


def test_log_report(store):
    result = compare("-e", store.name, "--by", "mean_abs", "-k", "3", "-f", "csv",
                     "--log-report", "--tracking-uri", store.uri)
    assert result.exit_code == 0, result.output
    client = store.client
    (report,) = client.search_runs([store.experiment_id], "tags.`gaptrack.report` = 'true'")
    assert f"report logged as run {report.info.run_id}" in result.stderr
    logged = client.download_artifacts(report.info.run_id, "ranking.csv")
    pd.testing.assert_frame_equal(pd.read_csv(logged), pd.read_csv(io.StringIO(result.stdout)))
    assert list(pd.read_csv(logged).run_id) == expected_order(
        client, store.tracked, "loss", "mean_abs")[:3]
    assert {a.path for a in client.list_artifacts(report.info.run_id)} == {
        "ranking.csv", "ranking.html", "gap_curves.png"}


def plain_experiment(uri):  # noqa: F811
    """An experiment with two runs that gaptrack did not track; its name."""
    client = MlflowClient(uri)
    name = f"gaptrack-plain-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    for i in range(2):
        log_run(client, experiment_id, f"plain-{i}", np.random.default_rng(i), tracked=False)
    return name


def error_cases(store, tmp_path):
    """(arguments, what the message must say) for each request that cannot be met."""
    plain = plain_experiment(store.uri)
    down = f"http://127.0.0.1:{free_port()}"
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    at = ["--tracking-uri", store.uri]
    return {
        "experiment": (["-e", "nope", *at], "experiment 'nope' not found"),
        "metric": (["-e", store.name, "-m", "acc", *at],
                   "metric 'acc' not found; tracked runs have: accuracy, loss"),
        "untracked": (["-e", plain, *at], f"no runs tracked by gaptrack (tag gaptrack.version) "
                                          f"in experiment '{plain}'"),
        "server": (["-e", store.name, "--tracking-uri", down],
                   f"tracking server {down} is unreachable"),
        "store": (["-e", store.name, "--tracking-uri", missing],
                  f"tracking store {missing} does not exist"),
        "filter": (["-e", store.name, "--filter", "params.x > 1", *at],
                   "filter 'params.x > 1' is not a valid MLflow search filter"),
        "by": (["-e", store.name, "--by", "last", *at],
               "'last' is not one of 'final', 'max_abs', 'mean_abs'"),
        "top-k": (["-e", store.name, "-k", "0", *at], "0 is not in the range x>=1"),
    }


def test_errors_are_one_message_without_traceback(store, tmp_path):
    for case, (args, message) in error_cases(store, tmp_path).items():
        result = compare(*args)
        assert result.exit_code != 0, case
        assert message in result.stderr, (case, result.stderr)
        assert "Traceback" not in result.output, case
        assert isinstance(result.exception, SystemExit), case


def run_cli(commands, tracking_uri, envs=None):
    """``gaptrack compare`` with each of ``commands`` (argument lists), each in a
    process of its own (with the variables of ``envs[i]``), all at once:
    ``[(exit code, stdout, stderr)]``."""
    procs = [subprocess.Popen([sys.executable, "-m", "gaptrack.cli", "compare", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                             **(envs[i] if envs else {})})
             for i, args in enumerate(commands)]
    outputs = [proc.communicate(timeout=120) for proc in procs]  # (stdout, stderr)
    return [(proc.returncode, *output) for proc, output in zip(procs, outputs)]


def test_subprocess(store, tmp_path):
    commands = [["-e", store.name, "--by", "final", "-f", "csv"]]
    # on SQLite, the errors a user meets first, in a real process
    errors = ({case: error_cases(store, tmp_path)[case]
               for case in ("experiment", "metric", "untracked", "server")}
              if store.uri.startswith("sqlite") else {})
    [(code, out, err), *failed] = run_cli(commands + [args for args, _ in errors.values()],
                                          tracking_uri=store.uri)
    assert code == 0, err
    ranked = pd.read_csv(io.StringIO(out))
    assert list(ranked.run_id) == expected_order(store.client, store.tracked, "loss", "final")
    for (case, (_, message)), (code, _, err) in zip(errors.items(), failed, strict=True):
        assert code != 0, case
        assert message in err, (case, err)
        assert "Traceback" not in err, case


def test_the_table_fits_the_terminal_with_the_stores_numbers(sqlite_uri):
    """In real processes at three terminal widths: no line wider than COLUMNS,
    the default columns (numeric ones left out from the right when they do not
    fit, said in the caption), each number the store's at one number of
    decimals a column, no negative zero."""
    store = fill(sqlite_uri)
    widths = (60, 80, 200)
    outputs = run_cli([["-e", store.name, "--params", "optimizer"]] * 3, store.uri,
                      envs=[{"COLUMNS": str(w)} for w in widths])
    expected = expected_order(store.client, store.tracked, "loss", "final")
    keys = {"fit": "fit/loss", "eval_train": "eval_train/loss", "gap": "gap/loss",
            "drift": "gap/loss/drift", "mode": "gap/loss/mode", "bn_ema": "gap/loss/bn_ema"}
    for width, (code, out, err) in zip(widths, outputs):
        assert code == 0, err
        assert max(map(len, out.splitlines())) <= width, out
        columns, rows = read_table(out)
        assert columns[:2] == ["rank", "run_name"] and "diagnosis" in columns
        left_out = [c for c in (*keys, "optimizer") if c not in columns]
        assert bool(left_out) == (width < 80)
        if left_out:
            assert f"(left out at this width: {', '.join(left_out)})" in " ".join(out.split())
        assert [ids_by_name(store)[row[1]] for row in rows] == expected
        for name in (c for c in columns if c in keys):
            cells = [row[columns.index(name)] for row in rows]
            assert len({decimals(c) for c in cells}) == 1, (name, cells)
            assert not any(re.fullmatch(r"-0\.0*", c) for c in cells), (name, cells)
            half = 0.5 * 10 ** -decimals(cells[0])
            for run_id, cell in zip(expected, cells):
                logged = store.series[run_id][keys[name]][-1]
                assert float(cell) == pytest.approx(logged, abs=half * 1.0001), (name, run_id)
        if "optimizer" in columns:
            assert [row[columns.index("optimizer")] for row in rows] == [
                store.client.get_run(r).data.params["optimizer"] for r in expected]


def test_cli_imports_no_tensorflow():
    code = ("import sys, gaptrack.compare, gaptrack.cli; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
