"""Benchmark ``gaptrack.rank_runs`` against SQLite and a local ``mlflow server``.

Fills a fresh SQLite tracking store with ``--runs`` tracked runs (bulk inserts
through the DB-API connection of MLflow's own SqlAlchemyStore engine, into the
tables it created), each with ``--epochs`` epochs of per-epoch gaptrack metrics
(8 keys x 2 metrics) and the run summaries, then prints, in one run:

- the time ``rank_runs(top_k=...)`` takes for each ranking key, against the
  SQLite store and against an ``mlflow server`` started on 127.0.0.1 over the
  same store (first call in the process, which includes MLflow's store set-up,
  and the median of 3 warm calls; the server is given 10 s after it first
  answers to finish starting its background job runner);
- the naive way: list the runs, fetch each run's ``gap/loss`` history, sort in
  Python; timed on ``--naive-sample`` runs and extrapolated linearly to all runs;
- the Python heap peak of a ranking (tracemalloc), for two sizes of ``top_k``.

The ranking returned is checked against the top runs computed from the values
generated here.

``--store postgresql`` does the same on a database it creates on the local
PostgreSQL (127.0.0.1:5432, user postgres; filled by SQL inside the server, see
``_postgres.py``) and drops at the end, and prints besides: the database's size,
where a warm ranking's time goes (the SQL statements, timed in this process
against the store directly; MLflow's store code around them; the rest of
``search_runs`` through the server: serialisation, HTTP, parsing; gaptrack's own
work) and the ``EXPLAIN (ANALYZE, BUFFERS)`` plan of the slowest statement of
each ranking. ``--index`` (opt-in, not MLflow's schema) then creates by hand an
index on ``latest_metrics (key, value)``, times the rankings again and shows the
plans (the index goes with the database): what the index MLflow does not create
would change.

Usage:
    python benchmarks/bench_compare.py --runs 10000
    python benchmarks/bench_compare.py --store postgresql --runs 100000 [--index]
"""

import argparse
import contextlib
import os
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

import _postgres  # noqa: E402
from _server import start_server, stop_server  # noqa: E402
from gaptrack.compare import rank_runs  # noqa: E402

EXPERIMENT = "bench-compare"
METRICS = ("loss", "accuracy")
KEYS = ("final", "max_abs", "mean_abs")


def fill_store(uri, artifacts, runs, epochs, seed=0):
    """Create the store and its runs; return {key: {run_id: |gap_<key>/loss|}}."""
    store = SqlAlchemyStore(uri, artifacts)
    experiment_id = int(store.create_experiment(EXPERIMENT))
    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    rows = {"runs": [], "metrics": [], "latest_metrics": [], "tags": [], "params": []}
    sizes = {key: {} for key in KEYS}
    for i in range(runs):
        run_id = uuid.uuid4().hex
        rows["runs"].append((run_id, f"run-{i}", "LOCAL", "bench", "", "bench", "FINISHED",
                             now + i, now + i + 1, "", "active", f"{artifacts}/{run_id}",
                             experiment_id))
        for m in METRICS:
            fit, eval_train, train_mode, precise_bn = rng.normal(0.0, 1.0, size=(4, epochs))
            gap = fit - eval_train
            series = {f"fit/{m}": fit, f"eval_train/{m}": eval_train,
                      f"train_mode/{m}": train_mode, f"precise_bn/{m}": precise_bn,
                      f"gap/{m}": gap, f"gap/{m}/drift": fit - train_mode,
                      f"gap/{m}/mode": train_mode - precise_bn,
                      f"gap/{m}/bn_ema": precise_bn - eval_train}
            for key, values in series.items():
                rows["metrics"] += [(key, float(v), now + s, s, False, run_id)
                                    for s, v in enumerate(values)]
                rows["latest_metrics"].append((key, float(values[-1]), now + epochs - 1,
                                               epochs - 1, False, run_id))
            summaries = {"final": gap[-1], "max_abs": np.max(np.abs(gap)),
                         "mean_abs": np.mean(np.abs(gap))}
            for key, value in summaries.items():
                row = (f"gap_{key}/{m}", float(value), now + epochs, 0, False, run_id)
                rows["metrics"].append(row)
                rows["latest_metrics"].append(row)
                if m == "loss":
                    sizes[key][run_id] = abs(value)
        rows["tags"] += [(k, v, run_id) for k, v in (
            ("gaptrack.version", "0.1.0"), ("gaptrack.diagnosis", "drift"),
            ("gaptrack.probe_size", "1024"), ("mlflow.runName", f"run-{i}"))]
        rows["params"] += [(k, v, run_id) for k, v in (
            ("learning_rate", f"{rng.uniform(1e-4, 1e-1):.5f}"), ("batch_size", "32"),
            ("epochs", str(epochs)))]
    columns = {
        "runs": "run_uuid, name, source_type, source_name, entry_point_name, user_id, status, "
                "start_time, end_time, source_version, lifecycle_stage, artifact_uri, "
                "experiment_id",
        "metrics": "key, value, timestamp, step, is_nan, run_uuid",
        "latest_metrics": "key, value, timestamp, step, is_nan, run_uuid",
        "tags": "key, value, run_uuid",
        "params": "key, value, run_uuid",
    }
    connection = store.engine.raw_connection()
    try:
        cursor = connection.cursor()
        for table, names in columns.items():
            marks = ", ".join("?" * len(names.split(",")))
            cursor.executemany(f'INSERT INTO {table} ({names}) VALUES ({marks})', rows[table])
        connection.commit()
    finally:
        connection.close()
    store.engine.dispose()
    return sizes


class Clock:
    """Seconds spent, in this process, in SQL statements (every SQLAlchemy engine)
    and in ``MlflowClient.search_runs``; the statements of the last call."""

    def __init__(self):
        self.sql = self.search = 0.0
        self.statements = []
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)
        search = MlflowClient.search_runs

        def timed_search(client, *args, **kwargs):
            start = time.perf_counter()
            try:
                return search(client, *args, **kwargs)
            finally:
                self.search += time.perf_counter() - start
        MlflowClient.search_runs = timed_search

    def reset(self):
        self.sql = self.search = 0.0
        self.statements = []

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        conn.info["bench_start"] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        seconds = time.perf_counter() - conn.info.pop("bench_start")
        self.sql += seconds
        self.statements.append((seconds, statement, parameters))


CLOCK = Clock()


def time_ranking(uri, top_k, expected):
    """{key: (first call s, median warm s, {part: s of the median warm call})};
    checks each ranking against ``expected``."""
    times = {}
    for key in KEYS:
        calls = []
        for _ in range(4):
            CLOCK.reset()
            start = time.perf_counter()
            ranking = rank_runs(EXPERIMENT, metric="loss", by=key, top_k=top_k, tracking_uri=uri)
            total = time.perf_counter() - start
            calls.append((total, {"sql": CLOCK.sql, "search_runs": CLOCK.search,
                                  "statements": list(CLOCK.statements)}))
        assert list(ranking.run_id) == expected[key], f"ranking by {key} is wrong"
        warm = sorted(calls[1:], key=lambda c: c[0])[1]
        times[key] = (calls[0][0], warm[0], warm[1])
    return times


def time_naive(uri, sample, total):
    """Seconds for the naive ranking of ``sample`` runs, and extrapolated to ``total``:
    list the runs, fetch each one's gap/loss history, rank in Python."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    start = time.perf_counter()
    runs = client.search_runs([experiment_id], "tags.`gaptrack.version` IS NOT NULL",
                              max_results=sample)
    sizes = {}
    for run in runs:
        gap = [p.value for p in sorted(client.get_metric_history(run.info.run_id, "gap/loss"),
                                       key=lambda p: p.step)]
        sizes[run.info.run_id] = max(abs(g) for g in gap)
    sorted(sizes, key=sizes.get, reverse=True)
    elapsed = time.perf_counter() - start
    return elapsed, elapsed * total / len(runs)


def heap_peak(uri, top_k):
    """Peak Python heap (MiB) while ranking by max_abs with ``top_k``."""
    tracemalloc.start()
    rank_runs(EXPERIMENT, metric="loss", by="max_abs", top_k=top_k, tracking_uri=uri)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


#: The index ``--index`` creates by hand (not in MLflow's schema).
INDEX = "CREATE INDEX bench_latest_metrics_key_value ON latest_metrics (key, value)"


def fill(args, root, name, top_k):
    """The store's URI, filled; the expected rankings."""
    artifacts = str(root / "artifacts")
    start = time.perf_counter()
    if name is None:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        sizes = fill_store(uri, artifacts, args.runs, args.epochs)
        expected = {key: sorted(s, key=s.get, reverse=True)[:top_k] for key, s in sizes.items()}
    else:
        uri = _postgres.uri(name)
        store = SqlAlchemyStore(uri, artifacts)  # MLflow creates its schema
        experiment_id = store.create_experiment(EXPERIMENT)
        store.engine.dispose()
        expected, steps = _postgres.fill(name, experiment_id, artifacts, args.runs, args.epochs,
                                         top_k)
        print("fill, s: " + ", ".join(f"{step} {s:.1f}" for step, s in steps.items()))
        print("size, MB: " + ", ".join(f"{t} {mb:,.0f}" for t, mb in _postgres.sizes(name).items()))
    print(f"filled {uri}: {args.runs} tracked runs x {args.epochs} epochs x "
          f"{8 * len(METRICS)} per-epoch keys in {time.perf_counter() - start:.1f} s")
    return uri, expected


def print_parts(results):
    """Where a warm ranking's time goes, by key."""
    direct = next(times for backend, (_, times, _) in results.items() if backend != "http")
    print("\nwhere the median warm call's time goes, s (SQL timed in this process against the "
          "store; the server runs the same statements):")
    for key, (_, warm, parts) in direct.items():
        http_warm, http_parts = results["http"][1][key][1:]
        print(f"  by={key:8s} direct {warm:.3f} = SQL {parts['sql']:.3f} "
              f"({len(parts['statements'])} statements) + MLflow store code "
              f"{parts['search_runs'] - parts['sql']:.3f} + gaptrack {warm - parts['search_runs']:.3f}"
              f" | http {http_warm:.3f} = search_runs through the server "
              f"{http_parts['search_runs']:.3f} (of which serialisation, HTTP, parsing ~"
              f"{http_parts['search_runs'] - parts['search_runs']:.3f}) + gaptrack "
              f"{http_warm - http_parts['search_runs']:.3f}")


def print_plans(name, times, title):
    """The plan of the slowest statement of each key's median warm call."""
    for key, (_, _, parts) in times.items():
        seconds, statement, parameters = max((s for s in parts["statements"]
                                              if s[1].startswith("SELECT DISTINCT runs")),
                                             key=lambda s: s[0])
        print(f"\n--- {title}, by={key}: slowest statement ({seconds:.3f} s in the ranking); "
              "EXPLAIN (ANALYZE, BUFFERS) of it now:")
        print(statement % {k: repr(v) for k, v in parameters.items()})
        print(_postgres.explain(name, statement, parameters))


#: The query MLflow could send for ``rank_runs(by="max_abs", top_k=10)``: its filter
#: already requires the metric, so one inner join serves filter and order (no CASE for
#: missing values), and no DISTINCT (``(key, run_uuid)`` is unique in latest_metrics
#: and tags): with an index on ``latest_metrics (key, value)`` the top runs are read
#: in index order and the scan stops after them.
REWRITTEN = f"""
    SELECT runs.*, m.value FROM runs
    JOIN latest_metrics m ON m.run_uuid = runs.run_uuid AND m.key = 'gap_max_abs/loss'
         AND m.is_nan = false AND m.value >= 0
    WHERE runs.experiment_id IN (SELECT experiment_id FROM experiments
                                 WHERE name = '{EXPERIMENT}')
      AND runs.lifecycle_stage = 'active'
      AND EXISTS (SELECT 1 FROM tags WHERE tags.run_uuid = runs.run_uuid
                  AND tags.key = 'gaptrack.version')
    ORDER BY m.value DESC, runs.start_time DESC, runs.run_uuid LIMIT 11"""


def print_rewritten(name, title):
    """The plan of :data:`REWRITTEN`, a query MLflow does not send."""
    print(f"\n--- not MLflow's query: what it could send for by=max_abs, {title}; "
          f"EXPLAIN (ANALYZE, BUFFERS):{REWRITTEN}")
    print(_postgres.explain(name, REWRITTEN, None))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="tracked runs in the store")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of history per run")
    parser.add_argument("--top-k", type=int, default=10, help="runs ranked per query")
    parser.add_argument("--naive-sample", type=int, default=200,
                        help="runs the naive way is timed on (then extrapolated)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: a database created and dropped on 127.0.0.1:5432")
    parser.add_argument("--index", action="store_true",
                        help="postgresql: also time with an index MLflow does not create, "
                             "on latest_metrics (key, value), made by hand")
    args = parser.parse_args()
    if args.index and args.store != "postgresql":
        parser.error("--index is for --store postgresql")
    top_k = min(args.top_k, args.runs)

    database = _postgres.database() if args.store == "postgresql" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(prefix="gaptrack-bench-") as tmp, database as name:
        root = Path(tmp)
        uri, expected = fill(args, root, name, top_k)
        sample = min(args.naive_sample, args.runs)
        results = {args.store: (uri, time_ranking(uri, top_k, expected),
                                time_naive(uri, sample, args.runs))}
        peaks = (heap_peak(uri, top_k), heap_peak(uri, min(10 * top_k, args.runs)))
        server, url = start_server(root, uri)
        try:
            results["http"] = (url, time_ranking(url, top_k, expected),
                               time_naive(url, sample, args.runs))
            if name is not None:
                print_plans(name, results[args.store][1], "MLflow's schema")
            if args.index:
                print_rewritten(name, "MLflow's schema")
                start = time.perf_counter()
                _postgres.execute(name, INDEX)
                print(f"\n{INDEX}  -- by hand, not MLflow's schema: "
                      f"{time.perf_counter() - start:.1f} s")
                indexed = time_ranking(uri, top_k, expected)
                results["http + index"] = (url, time_ranking(url, top_k, expected), None)
                print_plans(name, indexed, "with the hand-made index")
                print_rewritten(name, "with the hand-made index")
        finally:
            stop_server(server)

    print(f"\nrank_runs(top_k={top_k}) over {args.runs} runs, "
          f"seconds (first call in process / median of 3 warm calls):")
    for backend, (where, times, naive) in results.items():
        print(f"  {backend:12s} {where}")
        for key, (first, warm, _) in times.items():
            print(f"    by={key:8s} first {first:6.2f}  warm {warm:6.2f}")
        if naive is None:
            continue
        slowest = max(warm for _, warm, _ in times.values())
        print(f"    naive (list + one get_metric_history per run + sort): {naive[0]:.2f} s for "
              f"{sample} runs, extrapolated linearly to {args.runs}: {naive[1]:.1f} s")
        print(f"    naive / rank_runs (slowest key, warm): {naive[1] / slowest:.0f}x")
    print_parts(results)
    print(f"\nPython heap peak while ranking (tracemalloc): top_k={top_k}: {peaks[0]:.1f} MiB, "
          f"top_k={min(10 * top_k, args.runs)}: {peaks[1]:.1f} MiB")


if __name__ == "__main__":
    main()
