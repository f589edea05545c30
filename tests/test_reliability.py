"""A shared tracking server: many trainings at once, PostgreSQL, authentication;
trainings killed outright, then one ``gaptrack sync``."""

import json
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import worker
from conftest import MlflowServer
from gaptrack.keys import LAST_EPOCH_TAG
from gaptrack.sync import sync


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


#: Trainings killed at random moments in :func:`test_trainings_killed_at_random_moments`.
KILLS = 3


def test_trainings_killed_at_random_moments_are_whole_and_killed_after_one_sync(
        mlflow_server, tmp_path):
    """Three trainings (each its own run, in an experiment of its own) killed
    with SIGKILL at random moments, at once, then one ``sync``: every epoch a
    training finished is on its run exactly once, with its loss, and every run
    ends KILLED, tagged with its last epoch; the spools are gone."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    spool = tmp_path / "spool"
    spool.mkdir()
    procs = []
    for i in range(KILLS):
        env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.url,
                   MLFLOW_EXPERIMENT_NAME=f"killed-{tag}-{i}", GAPTRACK_SPOOL_DIR=str(spool))
        progress = tmp_path / f"progress-{i}.txt"
        procs.append((progress, worker.start(i, progress, env, tmp_path,
                                             target=worker.train_until_killed)))
    # the first killed at a random moment after its process started (most often
    # before its first epoch ended), the others at one after their first epoch
    delays = {i: rng.uniform(0.5, 3.0 if i == 0 else 4.0) for i in range(KILLS)}
    begun, deadline = {}, time.monotonic() + 300
    while delays:
        assert time.monotonic() < deadline, "the workers did not start"
        for i, (progress, proc) in enumerate(procs):
            if i not in begun and (progress if i else proc.log).exists():
                begun[i] = time.monotonic()
            if i in delays and i in begun and time.monotonic() >= begun[i] + delays[i]:
                os.kill(proc.process.pid, signal.SIGKILL)
                del delays[i]
        time.sleep(0.02)
    for _, proc in procs:
        assert proc.wait(timeout=30) == -signal.SIGKILL, f"random seed {seed}"
    results = sync(spool)
    assert [error for *_, error in results] == [None] * len(results), (seed, results)
    assert not list(spool.glob("*/meta.json"))
    client = MlflowClient(mlflow_server.url)
    epochs_seen = []
    for i, (progress, _) in enumerate(procs):
        finished = [line.split() for line in progress.read_text().splitlines()] \
            if progress.exists() else []
        experiment = client.get_experiment_by_name(f"killed-{tag}-{i}")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        assert len(runs) == (1 if finished else len(runs)) <= 1, (seed, i, runs)
        for run in runs:
            points = client.get_metric_history(run.info.run_id, "fit/loss")
            steps = [p.step for p in points]
            # each finished epoch once, with its loss; at most one more, logged
            # by the tracker before the kill came after it
            assert steps == list(range(len(steps))), (seed, i, steps)
            assert len(finished) <= len(steps) <= len(finished) + 1, (seed, i, steps)
            assert [p.value for p in points[:len(finished)]] == [
                float(loss) for _, loss in finished], (seed, i)
            assert run.info.status == "KILLED", (seed, i)
            assert run.data.tags[LAST_EPOCH_TAG] == (str(steps[-1]) if steps else "none")
        epochs_seen.append(len(finished))
    print(f"random seed {seed}: epochs finished before the kills {epochs_seen}")
