"""Training under ``tf.distribute`` strategies (:mod:`gaptrack.distribute`).

The arithmetic is checked in process against numpy; the strategies run in
subprocesses (``distributed.py``: logical CPU devices and ``TF_CONFIG`` must be
set before TensorFlow initialises), one per strategy, each running all its
checks and writing their numbers as JSON. They start ahead, all at once, when the
session starts (``launch_ahead``), and run while the tests before these do.
"""

import atexit
import json
import os
import subprocess
import sys
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from gaptrack.distribute import is_chief, shard_sizes, spread
from conftest import free_port, niced, sandbox_folder, session_server
from gaptrack.keys import EVAL_TRAIN, PROBE_SIZE_TAG, REPLICAS_TAG, SNAPSHOT_DIR, metric_key
from gaptrack.record import EpochRecord, Parts, RunHistory
from gaptrack.report import bn_spread_noise, build_report

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5


def _close(a, b, tolerance=TOLERANCE):
    return all(abs(a[k] - b[k]) <= tolerance * max(abs(b[k]), 1e-12) for k in b)


# -- pure parts -----------------------------------------------------------------------

@pytest.mark.parametrize("n, replicas, expected", [
    (50, 2, [25, 25]), (40, 2, [20, 20]), (41, 2, [21, 20]), (41, 3, [14, 14, 13]),
    (7, 3, [3, 3, 1]), (1, 2, [1, 0]), (50, 3, [17, 17, 16]),
])
def test_shard_sizes_split_as_the_strategy_does(n, replicas, expected):
    # the sizes MirroredStrategy's experimental_distribute_dataset gave (TF 2.21)
    assert [int(s) for s in shard_sizes(n, replicas)] == expected


def test_spread_against_pairwise_numpy():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 5))
    variances = rng.uniform(0.5, 2.0, size=(3, 5))
    epsilon = 1e-3
    scale = np.sqrt(variances.mean(axis=0) + epsilon)
    expected = max(
        max(np.max(np.abs(means[i] - means[j]) / scale),
            np.max(np.abs(np.log(variances[i] + epsilon) - np.log(variances[j] + epsilon))))
        for i, j in combinations(range(3), 2))
    assert spread(means, variances, epsilon) == pytest.approx(expected, rel=1e-12)
    assert spread([means[0]] * 2, [variances[0]] * 2, epsilon) == 0.0
    # scale-free: the layer's input times 10
    assert spread(10 * means, 100 * variances, 0.0) == pytest.approx(spread(means, variances, 0.0))


def test_the_chief_is_the_chief_task_else_worker_0():
    import tensorflow as tf

    class Strategy:
        def __init__(self, cluster, task_type, task_id):
            self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)

    workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    assert is_chief(Strategy(workers, "worker", 0))
    assert not is_chief(Strategy(workers, "worker", 1))
    with_chief = dict(workers, chief=["127.0.0.1:3"])
    assert is_chief(Strategy(with_chief, "chief", 0))
    assert not is_chief(Strategy(with_chief, "worker", 0))
    assert is_chief(tf.distribute.get_strategy())  # no cluster: one process


def _history(spread_value, probe_size=400):
    record = EpochRecord(step=0, fit={"loss": 0.5}, eval_train={"loss": 0.4},
                         train_mode={"loss": 0.45}, precise_bn={"loss": 0.42}, noise=0.01,
                         parts={"loss": Parts(0.1, 0.05, 0.03, 0.02)}, bn_spread=spread_value)
    return RunHistory("run", "run", [record], {REPLICAS_TAG: "2",
                                                PROBE_SIZE_TAG: str(probe_size)})


def test_report_explains_diverged_replicas_above_noise_only():
    noise = bn_spread_noise(400, 1.0)
    assert noise == pytest.approx(np.sqrt(2 / 400))
    above = build_report(_history(2 * noise)).context
    assert len(above) == 1
    assert "2 replicas" in above[0] and "synchronized=True" in above[0]
    assert build_report(_history(noise / 2)).context == []
    assert build_report(_history(None)).context == []


# -- the strategies' processes ---------------------------------------------------------

#: ``distributed.py``'s modes (each read through the module fixture of its name) and
#: how many processes each runs.
MODES = {"mirrored": 1, "multiworker": 2, "jax_data_parallel": 1}
#: The modes that log to the session's tracking server; the others to a SQLite store.
ON_SERVER = ("mirrored", "multiworker")
TIMEOUT_S = 300


def _env(tracking_uri, spool):
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, GAPTRACK_SPOOL_DIR=str(spool),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    return env


class StrategyRun:
    """One mode of ``distributed.py`` in processes of its own (logical CPU devices
    and ``TF_CONFIG`` must be set before TensorFlow initialises), each writing
    its numbers as JSON: started ahead, all modes at once, when the session
    starts (:func:`launch_ahead`), or by the fixture that reads it."""

    def __init__(self, mode):
        self.mode = mode
        self.folder = sandbox_folder(f"{mode}-")
        self.procs = []
        self.error = None
        self.started = threading.Event()

    def environments(self, tracking_uri):
        if self.mode == "jax_data_parallel":
            env = _env(f"sqlite:///{self.folder / 'mlflow.db'}", self.folder / "spool")
            env.update(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
            return [env]
        if self.mode == "mirrored":
            return [_env(tracking_uri, self.folder / "spool")]
        cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
        envs = [_env(tracking_uri, self.folder / f"spool{index}") for index in range(2)]
        for index, env in enumerate(envs):
            env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": index}})
        return envs

    def start(self, server=None):
        """Start the processes (once ``server``, a launched MlflowServer, answers);
        an error is raised by :meth:`results`."""
        try:
            if server is not None:
                server.wait_ready()
            for index, env in enumerate(self.environments(server and server.url)):
                with open(self.folder / f"stderr{index}.txt", "wb") as stderr:
                    self.procs.append(subprocess.Popen(
                        niced([sys.executable, str(HERE / "distributed.py"), self.mode,
                               str(self.folder / f"out{index}.json")]),
                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=stderr))
        except Exception as error:  # noqa: BLE001 - raised in the test that reads it
            self.error = error
        finally:
            self.started.set()

    def results(self):
        """Each process's JSON, once all ended; its stderr's end if one failed."""
        assert self.started.wait(TIMEOUT_S), f"{self.mode} did not start"
        if self.error is not None:
            raise self.error
        try:
            for proc in self.procs:
                proc.wait(timeout=TIMEOUT_S)
        finally:
            self.kill()
        for index, proc in enumerate(self.procs):
            error = (self.folder / f"stderr{index}.txt").read_text(errors="replace")
            assert proc.returncode == 0, error[-3000:]
        return [json.loads((self.folder / f"out{index}.json").read_text())
                for index in range(len(self.procs))]

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_RUNS = {}
_RUNS_LOCK = threading.Lock()


def launch_ahead(items):
    """At the session's start: the modes the selected tests read start at once,
    in the background (those on the server once it answers)."""
    wanted = {mode for item in items for mode in MODES if mode in item.fixturenames}
    for mode in sorted(wanted):
        with _RUNS_LOCK:
            run = _RUNS[mode] = StrategyRun(mode)
        server = session_server() if mode in ON_SERVER else None
        threading.Thread(target=run.start, args=(server,), name=f"launch-{mode}",
                         daemon=True).start()


def _results(mode, server=None):
    with _RUNS_LOCK:
        run = _RUNS.get(mode)
        if run is None:  # not started ahead
            run = _RUNS[mode] = StrategyRun(mode)
            run.start(server)
    return run.results()


@atexit.register
def _kill_runs():
    for run in _RUNS.values():
        run.kill()


# -- MirroredStrategy over 2 logical CPUs ----------------------------------------------

@pytest.fixture(scope="module")
def mirrored(mlflow_server):
    return _results("mirrored", mlflow_server)[0]


def test_mirrored_eval_train_is_the_saved_model(mirrored):
    bn = mirrored["bn"]
    # get_weights()/save() keep the first replica's BN statistics: eval_train is that model
    assert _close(bn["eval_train"], bn["saved_evaluate"])
    # evaluate() under the strategy mixes the replicas' diverged copies
    assert bn["strategy_evaluate"]["loss"] != bn["eval_train"]["loss"]


def test_mirrored_train_mode_uses_the_per_replica_batch(mirrored):
    for kind in ("train_mode", "precise_bn"):
        distributed, one_device = mirrored["bn"][kind]
        assert _close(distributed, one_device), kind
    # synchronized BN normalises with the global batch
    distributed, one_device = mirrored["sync"]["train_mode"]
    assert _close(distributed, one_device)


def test_mirrored_bn_spread_every_measured_epoch(mirrored):
    bn = mirrored["bn"]
    assert len(bn["spreads"]) == 3 and all(s > 0 for s in bn["spreads"])
    assert bn["spreads"][-1] == pytest.approx(bn["independent_spread"], rel=1e-12)
    assert bn["logged_spreads"] == pytest.approx(bn["spreads"])
    assert bn["tags"][REPLICAS_TAG] == "2"
    # the report speaks of the divergence exactly when the spread is above noise
    noise = bn_spread_noise(int(bn["tags"][PROBE_SIZE_TAG]), 1.0)
    assert bool(bn["context"]) == (bn["spreads"][-1] > noise)


def test_mirrored_replicas_agree_without_divergent_bn(mirrored):
    sync, plain = mirrored["sync"], mirrored["plain"]
    assert _close(sync["eval_train"], sync["strategy_evaluate"])
    assert _close(plain["eval_train"], plain["strategy_evaluate"])
    assert sync["spreads"] == [None]
    assert sync["tags"][REPLICAS_TAG] == "2"  # autolog under the strategy


def test_mirrored_recalibrate_bn_sets_every_replica(mirrored):
    recalibrated = mirrored["recalibrated"]
    assert recalibrated["spread"] == 0.0
    assert _close(recalibrated["strategy_evaluate"], recalibrated["precise_bn"])


# -- MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 ----------------------

@pytest.fixture(scope="module")
def multiworker(mlflow_server):
    """The chief's numbers and the other worker's."""
    return _results("multiworker", mlflow_server)


@pytest.mark.xfail(strict=True, reason=(
    "keras-team/keras#20585: Keras 3's fit() under MultiWorkerMirroredStrategy fails "
    "converting a PerReplica batch to a tensor (TF 2.16 to 2.21), without gaptrack"))
def test_multiworker_fit(multiworker):
    for worker in multiworker:
        assert worker["fit_error"] is None, worker["fit_error"]


def test_multiworker_one_run_logged_by_the_chief(multiworker, mlflow_server):
    from mlflow.tracking import MlflowClient

    chief, worker = multiworker
    assert chief["chief"] and not worker["chief"]
    assert chief["replicas"] == worker["replicas"] == 2
    # the worker creates nothing: no run, no request, no spool, no measurement
    assert worker["run_id"] is None and worker["requests"] == [] and worker["spool"] == []
    assert worker["measured"] == [False] * 3
    requests = chief["requests"]
    assert sum(path.endswith("runs/create") for _, path, _ in requests) == 1
    # one log_batch per epoch carrying that epoch's step, then the run summary
    assert [steps for _, _, steps in requests if steps] == [[0], [1], [2], [0]]
    # plus one snapshot upload per epoch
    assert sum(SNAPSHOT_DIR in path for _, path, _ in requests) == 3
    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(chief["run_id"], metric_key(EVAL_TRAIN, "loss"))
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert client.get_run(chief["run_id"]).data.tags[REPLICAS_TAG] == "2"


def test_multiworker_eval_train_is_the_strategy_evaluation(multiworker):
    chief = multiworker[0]
    assert _close({"loss": chief["eval_train"]["loss"]}, {"loss": chief["strategy_loss"]})


# -- JAX: keras.distribution.DataParallel over 2 host CPU devices ----------------------

@pytest.fixture(scope="module")
def jax_data_parallel():
    return _results("jax_data_parallel")[0]


def test_jax_data_parallel_normalises_bn_over_the_global_batch(jax_data_parallel):
    """On JAX a data-parallel step is one program over the global batch: BN
    normalises with the global batch's moments and there is one copy of its
    moving statistics (SPEC, Distributed training)."""
    result = jax_data_parallel
    assert result["backend"] == "jax" and result["devices"] == 2
    frozen = result["frozen"]
    assert _close(frozen["train_mode"], frozen["fit"])
    # the test can tell: each device's half alone normalises otherwise
    assert abs(frozen["per_device"]["loss"] - frozen["fit"]["loss"]) > 1e-3
    assert frozen["tags"][REPLICAS_TAG] == "2"
    assert frozen["spread"] is None  # one copy of the moving statistics
    trained = result["trained"]
    assert _close(trained["eval_train"], trained["evaluate"])
