"""Tests for gaptrack.compare: rank_runs and log_comparison against real MLflow stores.

Runs are written directly with MlflowClient: per-epoch ``fit/``, ``eval_train/``,
``train_mode/``, ``precise_bn/`` and ``gap/`` keys from seeded random numbers,
and the run summaries computed here with numpy. The expected ranking is then
recomputed from each run's logged ``gap/<m>`` history, independently of the
summaries the server sorts by.
"""

import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from gaptrack.compare import CompareError, log_comparison, rank_runs

EPOCHS = 4
KEYS = ("final", "max_abs", "mean_abs")


@pytest.fixture(params=["sqlite", "server"])
def uri(request):
    """A SQLite store, then the session's HTTP tracking server."""
    return request.getfixturevalue("sqlite_uri" if request.param == "sqlite" else "server_uri")


def log_run(client, experiment_id, name, rng, *, status="FINISHED", params=None, tracked=True,
            summaries=True, nan_gap=False, logged_series=None):
    """Log one run as gaptrack's tracker would, with random per-epoch values.

    Returns the run id; ``logged_series[run_id]`` (if given) gets the per-epoch
    arrays logged, by key.
    """
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000)
    logged, tags = [], []
    if tracked:
        for m in ("loss", "accuracy"):
            fit, eval_train, train_mode, precise_bn = rng.normal(0.0, 1.0, size=(4, EPOCHS))
            if nan_gap:
                fit[-1] = math.nan
            gap = fit - eval_train
            series = {
                f"fit/{m}": fit, f"eval_train/{m}": eval_train, f"train_mode/{m}": train_mode,
                f"precise_bn/{m}": precise_bn, f"gap/{m}": gap,
                f"gap/{m}/drift": fit - train_mode, f"gap/{m}/mode": train_mode - precise_bn,
                f"gap/{m}/bn_ema": precise_bn - eval_train,
            }
            logged += [Metric(k, float(v[s]), now + s, s) for k, v in series.items()
                       for s in range(EPOCHS)]
            if logged_series is not None:
                logged_series.setdefault(run_id, {}).update(series)
            if summaries:
                summary = {"final": gap[-1], "max_abs": np.max(np.abs(gap)),
                           "mean_abs": np.mean(np.abs(gap))}
                logged += [Metric(f"gap_{k}/{m}", float(v), now + EPOCHS, 0)
                           for k, v in summary.items()]
        tags = [RunTag("gaptrack.version", "0.1.0"), RunTag("gaptrack.probe_size", "64"),
                RunTag("gaptrack.diagnosis", str(rng.choice(["drift", "mode", "bn_ema"])))]
    else:
        logged = [Metric("loss", float(rng.normal()), now + s, s) for s in range(EPOCHS)]
    client.log_batch(run_id, metrics=logged, tags=tags,
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run_id, status)
    return run_id


def gap_history(client, run_id, metric):
    """The run's ``gap/<metric>`` values in epoch order, read back from MLflow."""
    points = sorted(client.get_metric_history(run_id, f"gap/{metric}"), key=lambda p: p.step)
    assert [p.step for p in points] == list(range(EPOCHS))
    return np.array([p.value for p in points])


def expected_order(client, run_ids, metric, by):
    """Run ids ranked by |gap| summarised as ``by``, from the logged histories."""
    gaps = {run_id: gap_history(client, run_id, metric) for run_id in run_ids}

    def size(run_id):
        gap = gaps[run_id]
        value = {"final": abs(gap[-1]), "max_abs": np.max(np.abs(gap)),
                 "mean_abs": np.mean(np.abs(gap))}[by]
        return -math.inf if math.isnan(value) else value

    return sorted(run_ids, key=size, reverse=True)


@dataclass
class Store:
    """An experiment filled with known runs."""

    client: MlflowClient
    uri: str
    name: str
    experiment_id: str
    tracked: list = field(default_factory=list)      # ranked runs
    sgd: list = field(default_factory=list)          # tracked runs with optimizer=sgd
    failed: str = ""
    untracked: list = field(default_factory=list)
    running: str = ""                                # tracked, no summaries yet
    series: dict = field(default_factory=dict)       # run id -> key -> per-epoch values


def fill(uri, seed=1):
    """A new experiment with 7 tracked runs (one FAILED), 2 untracked runs and
    a tracked run still running (no summaries). With the default seed the
    signs of ``gap_final`` alternate down the ranking, for loss and accuracy."""
    client = MlflowClient(uri)
    name = f"gaptrack-test-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    store = Store(client, uri, name, experiment_id)
    rng = np.random.default_rng(seed)
    for i in range(7):
        optimizer = "sgd" if i % 2 else "adam"
        status = "FAILED" if i == 3 else "FINISHED"
        run_id = log_run(client, experiment_id, f"run-{i}", rng, status=status,
                         params={"optimizer": optimizer, "batch_size": 32},
                         logged_series=store.series)
        store.tracked.append(run_id)
        if optimizer == "sgd":
            store.sgd.append(run_id)
        if status == "FAILED":
            store.failed = run_id
    for i, optimizer in enumerate(("sgd", "adam")):
        store.untracked.append(log_run(client, experiment_id, f"plain-{i}", rng, tracked=False,
                                       params={"optimizer": optimizer}))
    store.running = log_run(client, experiment_id, "running", rng, status="RUNNING",
                            summaries=False, params={"optimizer": "sgd"})
    return store


@pytest.fixture
def store(uri):
    return fill(uri)


def test_ranking_matches_logged_history(store):
    client = store.client
    for metric in ("loss", "accuracy"):
        for by in KEYS:
            ranking = rank_runs(store.name, metric=metric, by=by)
            expected = expected_order(client, store.tracked, metric, by)
            assert list(ranking["run_id"]) == expected, (metric, by)
            assert list(ranking["rank"]) == list(range(1, len(expected) + 1))
            if by == "final":  # both server-sorted streams were used, and interleaved
                signs = np.sign(ranking["gap_final"].to_numpy())
                assert np.count_nonzero(signs[1:] != signs[:-1]) >= 2
        for row in ranking.to_dict("records"):
            logged = store.series[row["run_id"]]
            gap = logged[f"gap/{metric}"]
            assert row["gap_final"] == pytest.approx(gap[-1])
            assert row["gap_max_abs"] == pytest.approx(np.max(np.abs(gap)))
            assert row["gap_mean_abs"] == pytest.approx(np.mean(np.abs(gap)))
            for column, key in (("fit", f"fit/{metric}"), ("eval_train", f"eval_train/{metric}"),
                                ("gap", f"gap/{metric}"), ("drift", f"gap/{metric}/drift"),
                                ("mode", f"gap/{metric}/mode"),
                                ("bn_ema", f"gap/{metric}/bn_ema")):
                assert row[column] == pytest.approx(logged[key][-1])
            assert row["drift"] + row["mode"] + row["bn_ema"] == pytest.approx(row["gap"])
        runs = {r.info.run_id: r for r in client.search_runs([store.experiment_id])}
        assert list(ranking.run_name) == [runs[r].info.run_name for r in ranking.run_id]
        assert list(ranking.status) == [runs[r].info.status for r in ranking.run_id]
        assert list(ranking.diagnosis) == [runs[r].data.tags["gaptrack.diagnosis"]
                                           for r in ranking.run_id]
        assert list(ranking["params.optimizer"]) == [runs[r].data.params["optimizer"]
                                                     for r in ranking.run_id]
        assert set(ranking.experiment) == {store.name}
    assert list(ranking.columns[15:]) == ["params.batch_size", "params.optimizer"]
    assert ranking.loc[ranking.run_id == store.failed, "status"].item() == "FAILED"
    assert store.running not in set(ranking.run_id)
    assert ranking.attrs["untracked_runs"] == len(store.untracked)


def test_top_k_is_the_head_of_the_full_ranking(store):
    for by in KEYS:
        full = rank_runs(store.name, by=by)
        for k in (1, 3, 7, 20):
            top = rank_runs(store.name, by=by, top_k=k)
            assert list(top.run_id) == list(full.run_id[:k]), (by, k)
            assert list(top["rank"]) == list(range(1, min(k, len(full)) + 1))


def test_filter_selects_runs_and_untracked_count(store):
    ranking = rank_runs(store.name, by="max_abs", filter_string="params.optimizer = 'sgd'")
    assert list(ranking.run_id) == expected_order(store.client, store.sgd, "loss", "max_abs")
    assert ranking.attrs["untracked_runs"] == 1  # plain-0 has optimizer=sgd, plain-1 not

    ranking = rank_runs(store.name, filter_string="metrics.`gap_max_abs/loss` < 2.0",
                        by="final")
    small = [r for r in store.tracked if np.max(np.abs(store.series[r]["gap/loss"])) < 2]
    assert 0 < len(small) < len(store.tracked)
    assert list(ranking.run_id) == expected_order(store.client, small, "loss", "final")


def test_several_experiments_by_name_and_id(uri):
    first, second = fill(uri, seed=1), fill(uri, seed=2)
    ranking = rank_runs([first.name, second.experiment_id], by="final", metric="accuracy")
    both = first.tracked + second.tracked
    assert list(ranking.run_id) == expected_order(first.client, both, "accuracy", "final")
    names = {**dict.fromkeys(first.tracked, first.name),
             **dict.fromkeys(second.tracked, second.name)}
    assert list(ranking.experiment) == [names[r] for r in ranking.run_id]
    assert ranking.attrs["untracked_runs"] == 4
    assert ranking.attrs["experiment_ids"] == [first.experiment_id, second.experiment_id]


def test_nan_gap_ranks_last(uri):
    client = MlflowClient(uri)
    name = f"gaptrack-nan-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    rng = np.random.default_rng(3)
    finite = [log_run(client, experiment_id, f"run-{i}", rng) for i in range(3)]
    diverged = log_run(client, experiment_id, "diverged", rng, nan_gap=True)
    for by in KEYS:
        ranking = rank_runs(name, by=by)
        assert list(ranking.run_id) == expected_order(client, finite, "loss", by) + [diverged]
        assert math.isnan(ranking[f"gap_{by}"].iloc[-1])


def test_log_comparison(store):
    ranking = rank_runs(store.name, by="max_abs", top_k=5)
    run_id = log_comparison(ranking)
    client = store.client
    run = client.get_run(run_id)
    assert run.info.experiment_id == store.experiment_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["gaptrack.report"] == "true"
    assert run.data.params["metric"] == "loss" and run.data.params["by"] == "max_abs"
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "ranking.csv", "ranking.html", "gap_curves.png"}

    csv = pd.read_csv(client.download_artifacts(run_id, "ranking.csv"))
    assert list(csv.run_id) == list(ranking.run_id)
    assert list(csv["rank"]) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(csv.gap_max_abs, ranking.gap_max_abs)
    with open(client.download_artifacts(run_id, "ranking.html")) as f:
        html = f.read()
    assert all(r in html for r in ranking.run_id)
    with open(client.download_artifacts(run_id, "gap_curves.png"), "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    again = rank_runs(store.name, by="max_abs")  # the report is neither ranked nor counted
    assert run_id not in set(again.run_id)
    assert again.attrs["untracked_runs"] == len(store.untracked)


def test_bad_requests_name_the_value(store):
    with pytest.raises(CompareError, match=r"experiment 'nope' not found \(by name or id\); "
                                           r"experiments: Default, gaptrack-") as error:
        rank_runs([store.name, "nope"])
    if store.uri.startswith("sqlite"):  # a fresh store: every experiment is listed
        assert str(error.value).endswith(f"experiments: Default, {store.name}")
    with pytest.raises(CompareError, match="experiment '999999' not found"):
        rank_runs("999999")
    with pytest.raises(CompareError,
                       match=r"metric 'acc' not found; tracked runs have: accuracy, loss$"):
        rank_runs(store.name, metric="acc")
    with pytest.raises(CompareError, match=r"ranking key 'last' not known; use one of: final"):
        rank_runs(store.name, by="last")
    with pytest.raises(CompareError, match="top_k must be >= 1, got 0"):
        rank_runs(store.name, top_k=0)
    with pytest.raises(CompareError, match=r"filter 'params.batch_size > 3' is not a valid"):
        rank_runs(store.name, filter_string="params.batch_size > 3")


def test_nothing_to_rank(uri):
    client = MlflowClient(uri)
    name = f"gaptrack-plain-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    for i in range(2):
        log_run(client, experiment_id, f"plain-{i}", np.random.default_rng(i), tracked=False)
    with pytest.raises(CompareError, match=f"no runs tracked by gaptrack .*'{name}'.*2 runs"):
        rank_runs(name)
    log_run(client, experiment_id, "running", np.random.default_rng(0), status="RUNNING",
            summaries=False)
    with pytest.raises(CompareError, match="no tracked run has gap_mean_abs/loss yet"):
        rank_runs(name, by="mean_abs")


def test_unreachable_server_and_missing_store(tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(CompareError, match=f"tracking server {url} is unreachable"):
        rank_runs("any", tracking_uri=url)
    assert time.monotonic() - start < 10  # no minutes of retries
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(CompareError, match=f"tracking store {missing} does not exist"):
        rank_runs("any", tracking_uri=missing)
    assert not (tmp_path / "none.db").exists()


def test_per_head_metrics_of_a_multi_output_model_rank(sqlite_uri):
    """Keras names a nested head's loss ``head/cls_loss``: real runs of a
    multi-output model rank by it, in Python and through ``gaptrack compare``."""
    import io

    import keras
    import mlflow
    from click.testing import CliRunner

    import gaptrack
    from builders import blobs
    from gaptrack.cli import main

    x, y = blobs(64)
    targets = {"head": {"cls": y, "reg": x[:, :1]}}
    mlflow.set_experiment("heads")
    for lr in (0.1, 0.01, 0.001):
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        h = keras.layers.Dense(8, activation="relu")(inp)
        model = keras.Model(inp, {"head": {
            "cls": keras.layers.Dense(3, activation="softmax", name="cls")(h),
            "reg": keras.layers.Dense(1, name="reg")(h)}})
        model.compile(keras.optimizers.Adam(lr),
                      loss={"head": {"cls": "sparse_categorical_crossentropy", "reg": "mse"}},
                      metrics={"head": {"cls": ["accuracy"], "reg": []}})
        tracker = gaptrack.GapTracker((x, targets), batch_size=16, bn_snapshots=False)
        model.fit(x, targets, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
        evaluated = model.evaluate(x, targets, verbose=0, return_dict=True)
        logged = MlflowClient().get_run(tracker.run_id).data.metrics
        assert logged["eval_train/head/cls_loss"] == pytest.approx(evaluated["head/cls_loss"],
                                                                   rel=1e-5)
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("heads").experiment_id])
    gaps = {r.info.run_id: abs(r.data.metrics["fit/head/cls_loss"]
                               - r.data.metrics["eval_train/head/cls_loss"]) for r in runs}
    expected = sorted(gaps, key=lambda run_id: -gaps[run_id])
    ranking = rank_runs("heads", metric="head/cls_loss")
    assert list(ranking.run_id) == expected
    assert list(ranking.gap_final.abs()) == pytest.approx([gaps[r] for r in expected], abs=1e-9)
    result = CliRunner().invoke(main, ["compare", "-e", "heads", "-m", "head/cls_loss",
                                       "-f", "csv", "--tracking-uri", sqlite_uri])
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(io.StringIO(result.stdout)).run_id) == expected
