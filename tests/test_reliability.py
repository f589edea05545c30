"""A shared tracking server: many trainings at once, PostgreSQL, authentication."""

import json
import os
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import worker
from conftest import MlflowServer


def start_workers(seeds, tracking_uri, tmp_path, extra_env=None, own=False):
    """A worker process (``worker.py``) for each seed, all at once:
    ``[(seed, out path, worker.Worker)]``."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, **(extra_env or {}))
    procs = []
    for seed in seeds:
        out = tmp_path / f"worker-{seed}.json"
        procs.append((seed, out, worker.start(seed, out, env, tmp_path, own=own)))
    return procs


def worker_results(procs):
    """``{seed: what the worker wrote, with its "output"}``, once each succeeded."""
    results = {}
    for seed, out, proc in procs:
        code = proc.wait(timeout=600)
        assert code == 0, f"exit code {code}:\n{proc.output[-3000:]}"
        results[seed] = json.loads(out.read_text())
        results[seed]["output"] = proc.output
    return results


def run_workers(seeds, tracking_uri, tmp_path, extra_env=None):
    return worker_results(start_workers(seeds, tracking_uri, tmp_path, extra_env))


def check_runs(client, results):
    """Each run has all its points, and only its own."""
    run_ids = {r["run_id"] for r in results.values()}
    assert len(run_ids) == len(results)
    for seed, result in results.items():
        run = client.get_run(result["run_id"])
        assert run.data.params == {"seed": str(seed)}
        assert run.data.tags["gaptrack.probe_size"] == str(result["probe_size"])
        for key, values in result["history"].items():
            points = client.get_metric_history(result["run_id"], f"fit/{key}")
            assert [p.step for p in points] == [0, 1, 2]
            assert [p.value for p in points] == values  # its own numbers, once each
        for key in ("gap/loss", "eval_train/loss", "train_mode/accuracy"):
            assert [p.step for p in client.get_metric_history(result["run_id"], key)] == [0, 1, 2]


@pytest.fixture
def postgres_uri():
    psycopg2 = pytest.importorskip("psycopg2")
    name = f"gaptrack_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_eight_trainings_at_once_against_a_postgresql_backed_server(tmp_path, postgres_uri):
    server = MlflowServer(tmp_path / "server")
    server.backend_uri = postgres_uri
    server.start(timeout=120)
    try:
        results = run_workers(range(8), server.url, tmp_path)
        check_runs(MlflowClient(server.url), results)
    finally:
        server.stop()


def test_four_trainings_at_once_against_the_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once, before the writers
    results = run_workers(range(4), uri, tmp_path)
    check_runs(MlflowClient(uri), results)


def test_basic_auth_server(tmp_path, monkeypatch):
    password = "s3cret-" + uuid.uuid4().hex[:8]
    server = MlflowServer(tmp_path / "auth-server", extra_args=["--app-name", "basic-auth"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", uuid.uuid4().hex)
    server.start(timeout=120)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY")
    try:
        creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        with_creds = start_workers([0], server.url, tmp_path, creds)
        # and at the same time, one without credentials (checked below)
        without = start_workers([1], server.url, tmp_path, own=True)
        ok = worker_results(with_creds)[0]
        assert ok["warnings"] == []
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(server.url)
        check_runs(client, {0: ok})
        # the password appears nowhere: params, tags, metrics' keys, artifacts, output
        run = client.get_run(ok["run_id"])
        text = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert password not in text and password not in ok["output"]
        artifacts = Path(client.download_artifacts(ok["run_id"], "", str(tmp_path / "dl")))
        for f in artifacts.rglob("*"):
            if f.is_file():
                assert password.encode() not in f.read_bytes(), f
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        # without credentials: training completes; one clear warning says what to set,
        # and what was not accepted waits in the spool
        refused = worker_results(without)[1]
        assert len(refused["history"]["loss"]) == 3
        assert any("HTTP 401" in w and "MLFLOW_TRACKING_USERNAME" in w
                   for w in refused["warnings"]), refused["warnings"]
        assert any("gaptrack sync" in w for w in refused["warnings"])
    finally:
        server.stop()
