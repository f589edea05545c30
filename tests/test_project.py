"""The MLflow project: ``mlflow run . --env-manager local`` on every entry point.

Each ``mlflow run`` is the real command in a subprocess, from the repository,
on a SQLite store of its own, in an experiment whose artifacts stay in the
test's directory, with a sandboxed home; the tests read back what it logged and
check it against numbers computed here. There is one ``mlflow run`` per
scenario, on tiny sizes, and one for each of main, sweep and compare; each pays
~10 s of CPU to import TensorFlow, so those the selected tests read start when
the session starts (``launch_ahead``), ``WORKERS`` at a time and below the suite's
priority, and run while the tests before these do. Bad parameters are checked
on ``python -m projects.run`` directly (rejected before TensorFlow is imported),
and once through ``mlflow run``.
"""

import functools
import math
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import niced, sandbox_folder

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "gaptrack-project-tests"
SUBPROCESS_TIMEOUT_S = 600
#: Relative tolerance between float32 values logged by two computations.
RTOL = 1e-5

#: Tiny sizes per scenario, the compiled metrics (besides loss), whether it has
#: validation data, and how many BN layers it has and whether they train.
SCENARIOS = {
    "batchnorm": dict(params={"epochs": 2, "samples": 200}, metrics=["accuracy"],
                      val=True, bn_layers=1, bn_trains=True),
    "deep_mlp": dict(params={"epochs": 2, "samples": 200, "depth": 3, "bn": 1,
                             "batch_size": 64}, metrics=["accuracy"],
                     val=True, bn_layers=4, bn_trains=True),
    "dense_l2": dict(params={"epochs": 2}, metrics=["accuracy"], val=True, bn_layers=0,
                     causes={"drift", "none"}),
    "dropout": dict(params={"epochs": 2, "samples": 200, "dropout": 0.3},
                    metrics=["accuracy"], val=True, bn_layers=0),
    "softmax_only": dict(params={"epochs": 2, "samples": 200}, metrics=["accuracy"],
                         val=True, bn_layers=0, causes={"drift", "none"}),
    # at learning rate 0.1 the model is right on its whole batch from iteration 24 (seed 0)
    "toy_binary": dict(params={"iterations": 26, "learning_rate": 0.1},
                       metrics=["binary_accuracy"], val=False, bn_layers=0,
                       causes={"drift", "none"}),
    "transfer": dict(params={"epochs": 2, "samples": 300, "steps_per_epoch": 3,
                             "probe_batches": 2, "pretrain_epochs": 1},
                     metrics=["accuracy"], val=False, bn_layers=2, bn_trains=True),
    # seed 002 as its user wrote it: autolog draws the probe from the pipeline
    "transfer_oversampled": dict(scenario="transfer",
                                 params={"epochs": 2, "samples": 300, "steps_per_epoch": 3,
                                         "pretrain_epochs": 1, "pipeline": "oversampled"},
                                 metrics=["accuracy"], val=True, bn_layers=2, bn_trains=True),
}


def scenario_of(name):
    """The scenario a ``SCENARIOS`` entry trains (an entry may be one form of it)."""
    return SCENARIOS[name].get("scenario", name)


class Store:
    """One SQLite tracking store (a copy of the module's template, which holds
    the test experiment), and the sandboxed environment its subprocesses run in.

    Each ``mlflow run`` gets its own store, so that runs can go in parallel
    without two processes writing to one SQLite file. ``as_a_user``: run as
    the README's ``mlflow run .`` does, with no experiment given (the runs go
    to MLflow's ``Default``, id 0) and ``TF_CPP_MIN_LOG_LEVEL`` not set.
    """

    def __init__(self, path, experiment_id, home, as_a_user=False):
        self.uri = f"sqlite:///{path}"
        self.experiment_id = "0" if as_a_user else experiment_id
        self.env = {
            **os.environ,  # conftest's sandbox: KERAS_HOME, XDG_*, MPLCONFIGDIR
            "HOME": str(home),
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_EXPERIMENT_ID": experiment_id,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TF_CPP_MIN_LOG_LEVEL": "3",
            # `python` and `mlflow` in the entry points' commands: this interpreter's
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        }
        self.experiment_args = ["--experiment-id", experiment_id]
        if as_a_user:
            del self.env["MLFLOW_EXPERIMENT_ID"], self.env["TF_CPP_MIN_LOG_LEVEL"]
            self.experiment_args = []

    @functools.cached_property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def mlflow_run(self, entry_point, params=None, **more):
        """``mlflow run . --env-manager local -e <entry point> -P k=v ...``
        (below the suite's priority: it runs while other tests do)."""
        command = niced([sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local",
                         "-e", entry_point, *self.experiment_args])
        for key, value in {**(params or {}), **more}.items():
            command += ["-P", f"{key}={value}"]
        return subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)

    def cli(self, *args):
        """``python -m projects.run ...`` from the repository."""
        return subprocess.run([sys.executable, "-m", "projects.run", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)

    def run_of(self, proc):
        """The run ``mlflow run`` reported, after checking it succeeded."""
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        run_id = re.search(r"=== Run \(ID '([0-9a-f]+)'\) succeeded ===", proc.stderr).group(1)
        return self.client.get_run(run_id)

    def history(self, run_id, key):
        """``{step: value}`` of one metric."""
        points = self.client.get_metric_history(run_id, key)
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), f"{key} logged twice at one step: {steps}"
        return {p.step: p.value for p in points}


#: Every ``mlflow run`` of the module: key -> (entry point, params). The longest first.
LAUNCHES = {
    "main": ("main", {"epochs": 1, "depth": 2, "samples": 120}),
    "sweep": ("sweep", {"scenario": "dropout", "grid": "dropout=0.2,0.6;batch_size=16",
                        "epochs": 1, "samples": 100}),
    **{name: ("train", {"scenario": scenario_of(name), **SCENARIOS[name]["params"]})
       for name in ("deep_mlp", "transfer", "transfer_oversampled", "toy_binary", "batchnorm",
                    "dropout", "dense_l2", "softmax_only")},
    "bad_epochs": ("train", {"scenario": "dense_l2", "epochs": "two"}),
}
#: The launch run as a user would (see ``Store``).
AS_A_USER = "softmax_only"
#: Experiment kinds the test experiment has before a launch: another kind is kept.
KIND_BEFORE = {"sweep": "genai_development"}
#: Parallel subprocesses: two cores, and each process also spends time waiting
#: (starting Python, the SQLite store).
WORKERS = 3


def reads(*keys):
    """Declares the ``LAUNCHES`` a test reads (a parametrized test's ``name``
    is read too), so that only those selected are started ahead."""

    def mark(test):
        test.launches = keys
        return test

    return mark


def _selected_launches(items):
    keys = set()
    for item in items:
        if getattr(item, "module", None) is not sys.modules[__name__]:
            continue
        keys.update(getattr(item.function, "launches", ()))
        callspec = getattr(item, "callspec", None)
        if callspec and callspec.params.get("name") in LAUNCHES:
            keys.add(callspec.params["name"])
    return [key for key in LAUNCHES if key in keys]


#: Makes the stores in a subprocess (MLflow's schema migrations, ~3 s), so that
#: nothing of MLflow runs in the suite's process beside its tests: an empty
#: store with the test experiment, copied to each path given (``path=kind``: with
#: that experiment kind); prints the experiment's id.
_MAKE_STORES = """
import shutil, sys
from mlflow.tracking import MlflowClient
template, name, artifacts, kind_tag, *copies = sys.argv[1:]
experiment_id = MlflowClient("sqlite:///" + template).create_experiment(
    name, artifact_location=artifacts)
for copy in copies:
    path, _, kind = copy.partition("=")
    shutil.copy(template, path)
    if kind:
        MlflowClient("sqlite:///" + path).set_experiment_tag(experiment_id, kind_tag, kind)
print(experiment_id)
"""


class Launched:
    """The module's ``mlflow run`` subprocesses, each on a store of its own,
    ``WORKERS`` at a time: those of the selected tests start ahead, when the
    session starts (:func:`launch_ahead`); ``launched[key]`` waits for one
    (starting it if no test declared it) and returns ``(store, completed
    process)``; ``launched.store("cli")`` is a store of its own for the tests
    that run commands themselves."""

    def __init__(self, keys):
        self.root = sandbox_folder("project-")
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="project")
        self._stores = ThreadPoolExecutor(max_workers=1).submit(self._make_stores)
        self.futures = {key: self.pool.submit(self._run, key) for key in keys}

    def _make_stores(self):
        from projects.experiment import KIND_TAG

        home = self.root / "home"
        home.mkdir()
        keys = [*LAUNCHES, "cli"]
        copies = [f"{self.root / key}.db" + (f"={KIND_BEFORE[key]}" if key in KIND_BEFORE else "")
                  for key in keys]
        proc = subprocess.run(
            niced([sys.executable, "-c", _MAKE_STORES, str(self.root / "template.db"),
                   EXPERIMENT, (self.root / "artifacts").as_uri(), KIND_TAG, *copies]),
            cwd=self.root, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        experiment_id = proc.stdout.split()[-1]
        return {key: Store(self.root / f"{key}.db", experiment_id, home,
                           as_a_user=key == AS_A_USER) for key in keys}

    def _run(self, key):
        return self.store(key).mlflow_run(*LAUNCHES[key])

    def __getitem__(self, key):
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self._run, key)
        return self.store(key), self.futures[key].result()

    def store(self, key):
        return self._stores.result()[key]

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


_LAUNCHED = []
_LAUNCHED_LOCK = threading.Lock()


def _launched(keys):
    with _LAUNCHED_LOCK:
        if not _LAUNCHED:
            _LAUNCHED.append(Launched(keys))
    return _LAUNCHED[0]


def launch_ahead(items):
    """At the session's start: the selected tests' ``mlflow run`` start."""
    _launched(_selected_launches(items))


@pytest.fixture(scope="module")
def project(request):
    """The module's :class:`Launched` ``mlflow run`` subprocesses."""
    launched = _launched(_selected_launches(request.session.items))
    yield launched
    launched.close()


@pytest.fixture
def scenario_run(project):
    """``scenario_run(name) -> (store, process, run)`` of ``mlflow run -e train``."""

    def get(name):
        store, proc = project[name]
        return store, proc, store.run_of(proc)

    return get


def _digits():
    from projects.datasets import load_dataset

    return load_dataset("digits", seed=0)


def _expected_training_data(name):
    """The training arrays the scenario should have logged, computed here from
    the data set and the scenario's documented selection."""
    params = SCENARIOS[name]["params"]
    ds = _digits()
    if name == "dense_l2":
        return ds.x_train[:32], ds.y_train[:32]
    if name == "toy_binary":
        return None
    x, y = ds.x_train[:params["samples"]], ds.y_train[:params["samples"]]
    if scenario_of(name) == "transfer":
        return x[1::2, ..., np.newaxis], (y[1::2] == 0).astype("float32")
    split = {"deep_mlp": 0.1}.get(name, 0.2)
    n = int(math.floor(len(x) * (1 - split)))
    return x[:n], y[:n]


# -- train: every scenario ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_train_logs_every_spec_key_at_every_epoch(scenario_run, name):
    spec = SCENARIOS[name]
    store, _, run = scenario_run(name)
    steps = set(range(spec["params"].get("epochs", spec["params"].get("iterations"))))
    metrics = ["loss", *spec["metrics"]]
    logged = set(run.data.metrics)

    prefixes = ["fit", "eval_train", "train_mode"] + (["val"] if spec["val"] else [])
    if spec.get("bn_trains"):
        prefixes.append("precise_bn")
    for m in metrics:
        keys = [f"{p}/{m}" for p in prefixes]
        keys += [f"gap/{m}", f"gap/{m}/drift", f"gap/{m}/mode", f"gap/{m}/bn_ema"]
        history = {key: store.history(run.info.run_id, key) for key in keys}
        for key, points in history.items():
            assert set(points) == steps, f"{key} at steps {sorted(points)}, expected {steps}"
        for step in steps:
            fit, ev = history[f"fit/{m}"][step], history[f"eval_train/{m}"][step]
            parts = [history[f"gap/{m}/{p}"][step] for p in ("drift", "mode", "bn_ema")]
            assert history[f"gap/{m}"][step] == pytest.approx(fit - ev, abs=1e-6)
            assert sum(parts) == pytest.approx(fit - ev, abs=1e-6)
            assert history[f"gap/{m}/drift"][step] == pytest.approx(
                fit - history[f"train_mode/{m}"][step], abs=1e-6)
        if not spec.get("bn_trains"):
            assert f"precise_bn/{m}" not in logged
            assert all(v == 0.0 for v in history[f"gap/{m}/bn_ema"].values())
        if not spec["val"]:
            assert f"val/{m}" not in logged
        assert run.data.metrics[f"gap_final/{m}"] == pytest.approx(
            history[f"gap/{m}"][max(steps)], abs=1e-7)

    lags = sorted(k for k in logged if k.startswith(("staleness/mean/", "staleness/var/")))
    assert len(lags) == 2 * spec["bn_layers"], lags
    for key in lags:
        assert set(store.history(run.info.run_id, key)) == steps, key

    assert run.data.tags["gaptrack.version"]
    # no Dropout and no BN: mode and bn_ema are 0, so only drift (or noise) can explain
    assert run.data.tags["gaptrack.diagnosis"] in spec.get(
        "causes", {"drift", "mode", "bn_ema", "none"})


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_train_logs_params_and_the_training_data(scenario_run, name):
    import mlflow

    spec = SCENARIOS[name]
    _, _, run = scenario_run(name)
    params = run.data.params
    expected = _expected_training_data(name)
    n_train = 160 if expected is None else len(expected[0])

    assert params["scenario"] == scenario_of(name)
    for key, value in spec["params"].items():
        assert params[key] == str(value), key
    assert params["probe_size"] == "10000" and params["seed"] == "0"  # declared defaults
    assert params["train_samples"] == str(n_train)
    assert params["probe_samples"] == run.data.tags["gaptrack.probe_size"]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    if name == "toy_binary":
        assert params["dataset_size"] == "160"
        assert params["probe_samples"] == "160"
        assert set(inputs) == {"toy_clusters"}
        return
    ds = _digits()
    assert params["dataset"] == "digits"
    assert params["dataset_size"] == str(len(ds.x_train))
    training = inputs["digits"]
    assert [t.value for t in training.tags if t.key == "mlflow.data.context"] == ["training"]
    x, y = expected
    assert training.dataset.digest == mlflow.data.from_numpy(x, targets=y).digest
    if name == "transfer":  # the probe: 2 batches of 32 of the pipeline
        assert params["probe_samples"] == "64"
    elif name == "transfer_oversampled":  # drawn by autolog: steps_per_epoch batches of 32
        assert params["probe_samples"] == "96"
    else:
        assert params["probe_samples"] == str(n_train)


@reads("transfer_oversampled")
def test_transfer_oversampled_is_seed_002_under_autolog(scenario_run, tmp_path):
    """pipeline=oversampled: gaptrack.autolog() drew the probe, the pipeline's
    first steps_per_epoch batches (the tag and the report say it is one draw),
    validation is the test split, and the checkpoint ModelCheckpoint kept (the
    epoch of the lowest val/loss) is logged: evaluate() of it, computed here,
    is that epoch's val/loss and, on the pipeline's first 3 batches rebuilt
    here, its eval_train/loss."""
    import keras

    from projects import transfer
    from projects.params import parse

    store, _, run = scenario_run("transfer_oversampled")
    tags = run.data.tags
    assert tags["gaptrack.probe_size"] == "96"
    assert "one fixed draw of the training pipeline, its first 3 batches" in \
        tags["gaptrack.probe_origin"]
    report = (Path(store.client.download_artifacts(run.info.run_id, "gaptrack/report/report.md",
                                                    str(tmp_path)))).read_text()
    assert "The probe, the training samples evaluate() is measured on every epoch, is one " \
        "fixed draw" in report
    assert run.data.params["validation_samples"] == str(len(_digits().x_test))

    config, _ = parse([(k, str(v)) for k, v in SCENARIOS["transfer_oversampled"]["params"].items()],
                      transfer.PARAMS)
    data = transfer.data(config)
    keras.utils.set_random_seed(config["seed"])  # as the run did: its first pass
    batches = list(transfer.stream(data, config).take(3).as_numpy_iterator())
    probe = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    model = keras.saving.load_model(store.client.download_artifacts(
        run.info.run_id, "checkpoint/best.keras", str(tmp_path)))
    val = store.history(run.info.run_id, "val/loss")
    best = min(val, key=val.get)
    evaluate = model.evaluate(*probe, batch_size=32, verbose=0)[0]
    assert store.history(run.info.run_id, "eval_train/loss")[best] == pytest.approx(evaluate,
                                                                                    rel=RTOL)
    assert val[best] == pytest.approx(model.evaluate(*data.validation, batch_size=32,
                                                     verbose=0)[0], rel=RTOL)


@reads("dense_l2")
def test_dense_l2_fit_loss_is_the_untrained_loss_and_val_is_eval(scenario_run):
    """fit/loss at epoch 0 is the loss of the untrained model on the batch,
    computed here by a model built independently with the same seed; with no
    Dropout/BN, val/loss (the batch, after the update) equals eval_train/loss,
    and the next epoch's fit/loss equals it too."""
    import keras

    store, _, run = scenario_run("dense_l2")
    fit = store.history(run.info.run_id, "fit/loss")
    val = store.history(run.info.run_id, "val/loss")
    ev = store.history(run.info.run_id, "eval_train/loss")

    ds = _digits()
    x, y = ds.x_train[:32], ds.y_train[:32]
    keras.utils.set_random_seed(0)
    l2 = keras.regularizers.L2(0.01)
    model = keras.Sequential([
        keras.Input((8, 8)), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_regularizer=l2),
        keras.layers.Dense(64, activation="relu", kernel_regularizer=l2),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    untrained = model.evaluate(x, y, batch_size=32, verbose=0)
    # the L2 penalty is part of it: 0.01 * sum of squared kernels
    penalty = 0.01 * sum(float(np.sum(np.square(layer.kernel.numpy())))
                         for layer in model.layers if getattr(layer, "kernel_regularizer", None))
    assert penalty > 0.1

    assert fit[0] == pytest.approx(untrained, rel=RTOL)
    for epoch in (0, 1):
        assert val[epoch] == pytest.approx(ev[epoch], rel=RTOL)
    assert fit[1] == pytest.approx(val[0], rel=RTOL)
    assert fit[0] > val[0]  # one Adam step lowers the loss on its own batch


@reads("softmax_only")
def test_softmax_only_gap_is_all_drift(scenario_run):
    """Nothing behaves differently in training: training mode and inference
    mode give the same numbers, so the whole gap is drift."""
    store, _, run = scenario_run("softmax_only")
    for m in ("loss", "accuracy"):
        train = store.history(run.info.run_id, f"train_mode/{m}")
        ev = store.history(run.info.run_id, f"eval_train/{m}")
        for step in train:
            assert train[step] == pytest.approx(ev[step], rel=RTOL, abs=1e-7)
        gap = store.history(run.info.run_id, f"gap/{m}")
        drift = store.history(run.info.run_id, f"gap/{m}/drift")
        assert drift == pytest.approx(gap, abs=1e-6)


@reads("toy_binary")
def test_toy_binary_reports_accuracy_before_the_update(scenario_run):
    """train_on_batch's accuracy is that of the model before its update: it
    equals test_on_batch's just before (so nothing leaks between the calls'
    metric accumulators), and each iteration's 'after' is what the model then
    is on that batch."""
    store, proc, run = scenario_run("toy_binary")
    rid = run.info.run_id
    steps = range(SCENARIOS["toy_binary"]["params"]["iterations"])
    reported = store.history(rid, "fit/binary_accuracy")
    before = store.history(rid, "fit/binary_accuracy_before")
    loss, loss_before = store.history(rid, "fit/loss"), store.history(rid, "fit/loss_before")
    assert set(store.history(rid, "fit/binary_accuracy_after")) == set(steps)
    for step in steps:
        assert reported[step] == before[step]
        assert loss[step] == pytest.approx(loss_before[step], rel=RTOL)
        # a multiple of 1/32: accuracy on one batch of 32 points
        assert reported[step] * 32 == pytest.approx(round(reported[step] * 32), abs=1e-4)
    assert f"iteration {steps[-1]}: train_on_batch accuracy" in proc.stdout


def test_toy_binary_broadcast_accuracy_is_the_questions_call():
    """The scenario's broadcast accuracy is the question's call, with model.predict,
    on the scenario's model made right on every point: p² + (1 - p)² of numpy."""
    import keras

    from projects import toy_binary

    config = {"seed": 0, "batch_size": 32, "learning_rate": 0.005, "iterations": 1}
    data = toy_binary.data(config)
    model = toy_binary.model(config, data)
    first, last = model.layers[0], model.layers[-1]
    first.set_weights([np.pad(np.ones((2, 1), "float32"), ((0, 0), (0, 11))),
                       np.full(12, -30.0, "float32")])  # unit 0: relu(x0 + x1 - 30)
    last.set_weights([np.pad(np.ones((1, 1), "float32"), ((0, 11), (0, 0))),
                      np.array([-5.0], "float32")])
    x, y = data.x[60:92], data.y[60:92]  # 20 zeros, then 12 ones
    predictions = model.predict(x, verbose=0)
    assert ((predictions[:, 0] > 0.5) == y).all()  # numpy: right on every point
    question = keras.metrics.BinaryAccuracy()
    question.update_state(np.expand_dims(y, axis=0), predictions)
    p = np.mean(y)
    assert toy_binary.broadcast_accuracy(model, x, y) == float(question.result()) == \
        pytest.approx(p ** 2 + (1 - p) ** 2) == 0.53125


@reads("toy_binary")
def test_toy_binary_logs_the_question_accuracy_beside_the_true_one(scenario_run):
    """The question's own metric call, (1, 32) labels against (32, 1) predictions,
    is logged beside the true accuracy. Replayed here (same seed, same batches,
    the predictions before and after each step), both equal numpy's; where the
    model is right on its whole batch the question's value is p² + (1 - p)² of the
    batch's labels and the true one 1, and where it is also right on all 160
    points (the clusters separated) the drift is 0."""
    import keras

    from projects import toy_binary

    store, proc, run = scenario_run("toy_binary")
    rid = run.info.run_id
    params = SCENARIOS["toy_binary"]["params"]
    config = {"seed": 0, "batch_size": 32, **params}
    data = toy_binary.data(config)
    keras.utils.set_random_seed(0)
    model = toy_binary.model(config, data)
    rng = np.random.default_rng(0)
    logged = {f"{kind}_{when}": store.history(rid, f"fit/{kind}_{when}")
              for kind in ("binary_accuracy", "broadcast_accuracy") for when in ("before", "after")}
    fit, evaluate = store.history(rid, "fit/binary_accuracy"), \
        store.history(rid, "eval_train/binary_accuracy")
    drift = store.history(rid, "gap/binary_accuracy/drift")
    perfect, separated = [], []
    for step in range(params["iterations"]):
        index = rng.integers(0, len(data.x), 32)  # the scenario's batch
        x, y = data.x[index], data.y[index]
        for when in ("before", "after"):
            if when == "after":
                model.train_on_batch(x, y)
            right = model.predict_on_batch(x)[:, 0] > 0.5
            true, question = logged[f"binary_accuracy_{when}"], logged[f"broadcast_accuracy_{when}"]
            assert true[step] == pytest.approx(np.mean(right == y)), (step, when)
            assert question[step] == pytest.approx(np.mean(right[:, None] == y[None, :]))
            if (right == y).all():
                p = np.mean(y)
                assert true[step] == 1.0
                assert question[step] == pytest.approx(p ** 2 + (1 - p) ** 2, abs=1e-7)
                perfect.append((step, when, int(y.sum()), question[step]))
        if fit[step] == 1.0 and evaluate[step] == 1.0:
            assert drift[step] == 0.0
            separated.append(step)
    assert len(perfect) >= 2 and separated, (perfect, separated)
    assert "p² + (1 - p)²" in proc.stdout and "Which is which" in proc.stdout


# -- main and sweep: grids as nested runs, ranked ---------------------------------


def _children(store, parent_id):
    return store.client.search_runs(
        [store.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def _check_printed_ranking(proc, children, metric):
    """The printed table lists the children by |gap_final/<metric>|, largest
    first, with their logged gap (column ``gap``, right-aligned under its
    header, at the table's number of decimals) and names (cut to the width)."""
    ranked = sorted(children, key=lambda r: -abs(r.data.metrics[f"gap_final/{metric}"]))
    lines = proc.stdout[proc.stdout.index("ranked by"):].splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line) == {"─"})
    header = lines[rule - 1]
    name_at, gap_end = header.index("run_name"), re.search(r"(?<!\S)gap(?!\S)", header).end()
    rows = lines[rule + 1:rule + 1 + len(ranked)]
    for rank, (r, line) in enumerate(zip(ranked, rows), 1):
        assert line.split()[0] == str(rank), lines
        printed = line[name_at:]
        assert (r.info.run_name.startswith(printed.split("…")[0]) if "…" in printed
                else printed.startswith(r.info.run_name)), (r.info.run_name, line)
        gap = re.search(r"\S+$", line[:gap_end]).group()
        half = 0.5 * 10 ** -len(gap.partition(".")[2])
        assert float(gap) == pytest.approx(r.data.metrics[f"gap_final/{metric}"],
                                           abs=half * 1.0001), (r.info.run_name, line)


@reads("main")
def test_main_runs_the_seeds_grid_as_nested_runs_and_ranks_them(project):
    store, proc = project["main"]
    parent = store.run_of(proc)
    children = _children(store, parent.info.run_id)

    grid = {(r.data.params["bn"], r.data.params["batch_size"]) for r in children}
    assert grid == {("0", "32"), ("0", "1024"), ("1", "32"), ("1", "1024")}
    assert len(children) == 4
    for child in children:
        assert child.data.params["scenario"] == "deep_mlp"
        assert child.data.params["depth"] == "2"
        assert child.data.params["epochs"] == "1"
        assert child.info.status == "FINISHED"
        bn_lags = [k for k in child.data.metrics
                   if k.startswith(("staleness/mean/", "staleness/var/"))]
        assert len(bn_lags) == (2 * 3 if child.data.params["bn"] == "1" else 0)
    assert parent.data.params["epochs"] == "1"
    assert parent.data.params["grid"] == "bn=0,1;batch_size=32,1024"
    assert "gaptrack.version" not in parent.data.tags  # the parent is not a tracked run
    _check_printed_ranking(proc, children, "loss")
    ranking = store.client.download_artifacts(parent.info.run_id, "ranking.csv",
                                              str(Path(os.environ["XDG_CACHE_HOME"])))
    import pandas as pd

    assert sorted(pd.read_csv(ranking)["run_id"]) == sorted(c.info.run_id for c in children)


@reads("sweep")
def test_sweep_runs_a_given_grid_with_fixed_params(project):
    store, proc = project["sweep"]
    parent = store.run_of(proc)
    children = _children(store, parent.info.run_id)
    assert sorted(c.data.params["dropout"] for c in children) == ["0.2", "0.6"]
    for child in children:
        assert child.data.params["batch_size"] == "16"
        assert child.data.params["samples"] == "100"
        assert child.data.tags["gaptrack.batch_size"] == "16"
    _check_printed_ranking(proc, children, "loss")


@reads("main")
def test_compare_ranks_the_experiment_and_is_itself_a_report(project):
    """compare over main's store: the 4 tracked children ranked, the parent
    counted as untracked, the compare run itself tagged as a report."""
    store, proc = project["main"]
    store.run_of(proc)
    proc = store.mlflow_run("compare", experiment=EXPERIMENT, metric="loss", top_k=3)
    run = store.run_of(proc)
    assert run.data.tags["gaptrack.report"] == "true"
    tracked = store.client.search_runs([store.experiment_id],
                                       "tags.`gaptrack.version` IS NOT NULL")
    assert len(tracked) == 4
    top = sorted(tracked, key=lambda r: -abs(r.data.metrics["gap_final/loss"]))
    _check_printed_ranking(proc, top[:3], "loss")
    assert top[3].info.run_name not in proc.stdout
    assert "note: 1 runs were not tracked by gaptrack" in proc.stderr


# -- in the MLflow UI: the parent's name, the experiment's kind, the ranking as a table --


@reads("main")
def test_main_names_its_parent_declares_the_experiment_and_logs_the_ranking_table(project,
                                                                                  tmp_path):
    import json

    import pandas as pd

    from projects.experiment import CUSTOM_MODEL_DEVELOPMENT, KIND_TAG
    from projects.sweep import RANKING_TABLE

    store, proc = project["main"]
    parent = store.run_of(proc)
    parent_id = parent.info.run_id
    assert parent.info.run_name == "main: deep_mlp bn × batch_size"
    assert parent.data.tags["mlflow.runName"] == parent.info.run_name
    # the test experiment had no kind: now it is a model-training one
    experiment = store.client.get_experiment(store.experiment_id)
    assert experiment.tags[KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT
    assert proc.stdout.endswith(
        f"then open http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs"
        "?workflowType=machine_learning\n")

    # the table artifact is the ranking.csv frame, registered as a table for the UI
    table = json.loads(Path(store.client.download_artifacts(
        parent_id, RANKING_TABLE, str(tmp_path))).read_text())
    csv = pd.read_csv(store.client.download_artifacts(parent_id, "ranking.csv", str(tmp_path)),
                      dtype={c: str for c in table["columns"] if c.startswith("params.")})
    shown = pd.DataFrame(table["data"], columns=table["columns"])
    pd.testing.assert_frame_equal(shown, csv, check_dtype=False)
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == \
        [{"path": RANKING_TABLE, "type": "table"}]
    children = sorted(_children(store, parent_id),
                      key=lambda r: -abs(r.data.metrics["gap_final/loss"]))
    assert list(shown["run_name"]) == [c.info.run_name for c in children]
    # pandas' JSON keeps 10 decimals
    assert list(shown["gap_final"]) == pytest.approx(
        [c.data.metrics["gap_final/loss"] for c in children], abs=1e-10)
    assert list(shown["rank"]) == [1, 2, 3, 4]


@reads("sweep")
def test_sweep_names_its_parent_and_keeps_the_experiments_kind(project):
    from projects.experiment import KIND_TAG

    store, proc = project["sweep"]
    parent = store.run_of(proc)
    assert parent.info.run_name == "sweep: dropout dropout × batch_size"
    assert store.client.get_experiment(store.experiment_id).tags[KIND_TAG] == \
        KIND_BEFORE["sweep"]


@reads(AS_A_USER)
def test_without_an_experiment_the_run_goes_to_default_declared_and_quiet(scenario_run):
    """As the README's command runs: into Default, which gets the kind, and
    without TensorFlow's CPU-feature lines (TF_CPP_MIN_LOG_LEVEL=2). Its oneDNN
    line stays: TensorFlow 2.21 prints it before its logging reads the level."""
    from projects.experiment import CUSTOM_MODEL_DEVELOPMENT, KIND_TAG

    store, proc, run = scenario_run(AS_A_USER)
    assert run.info.experiment_id == "0"
    assert store.client.get_experiment("0").tags[KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT
    assert "The runs are in experiment 'Default' (id 0) of " + store.uri in proc.stdout
    assert f"See them: mlflow ui --backend-store-uri {store.uri}, then open " \
        "http://127.0.0.1:5000/#/experiments/0/runs?workflowType=machine_learning" in proc.stdout
    assert "cpu_feature_guard" not in proc.stderr
    assert "This TensorFlow binary is optimized" not in proc.stderr


@pytest.mark.parametrize("given, kept", [(None, "2"), ("0", "0")])
def test_the_entry_points_quiet_tensorflow_unless_told_otherwise(given, kept):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if given is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = given
    code = ("import os, sys, projects.run; "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.stdout.split() == [kept, "False"], proc.stderr


# -- bad parameters ---------------------------------------------------------------

BAD = [
    (["train", "--scenario", "foo"], "scenario 'foo' is unknown; choose one of: batchnorm, "
                                     "deep_mlp, dense_l2, dropout, softmax_only, toy_binary, "
                                     "transfer"),
    (["train", "--dataset", "imagenet"], "dataset 'imagenet' is unknown; choose one of: digits"),
    (["train", "--epochs", "0"], "epochs must be an integer >= 1, got '0'"),
    (["train", "--batch_size", "-1"], "batch_size must be an integer >= 1, got '-1'"),
    (["train", "--probe_size", "0"], "probe_size must be an integer >= 1, got '0'"),
    (["train", "--learning_rate", "fast"], "learning_rate must be a number in (0, inf), "
                                           "got 'fast'"),
    (["train", "--scenario", "deep_mlp", "--bn", "maybe"], "bn must be 0 or 1"),
    (["train", "--scenario", "toy_binary", "--epochs", "3"],
     "parameter 'epochs' is not accepted by scenario toy_binary; accepted: batch_size, "
     "iterations"),
    (["train", "--scenario", "transfer", "--base_weights", "imagenet"],
     "base_weights 'imagenet' is not available"),
    (["train", "--scenario", "transfer", "--base_weights", "base.h5"],
     "base_weights must be 'pretrain' or the path of an existing .weights.h5 file, got "
     "'base.h5'"),
    (["train", "--validation_split", "1"], "validation_split must be a number in [0, 1), "
                                           "got '1'"),
    (["sweep", "--grid", "batch_size=32,x"], "batch_size must be an integer >= 1, got 'x'"),
    (["sweep", "--grid", "bn"], "grid 'bn' is not of the form name=v1,v2;name=v1,v2"),
    (["sweep", "--grid", "colour=red"], "grid parameter 'colour' is not accepted by scenario "
                                        "deep_mlp"),
    (["main", "--bn", "1"], "parameter 'bn' is not accepted by main"),
    (["compare", "--by", "worst"], "by 'worst' is unknown; choose one of: final, max_abs, "
                                   "mean_abs"),
]


@pytest.fixture(scope="module")
def bad_parameter_runs(project):
    """``python -m projects.run`` on every BAD case, all at once (no TensorFlow
    is imported: a bad value is rejected before)."""
    store = project.store("cli")
    with ThreadPoolExecutor(max_workers=len(BAD)) as pool:
        return list(pool.map(lambda case: store.cli(*case[0]), BAD))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_parameter_is_one_clear_line(bad_parameter_runs, case):
    message = BAD[case][1]
    proc = bad_parameter_runs[case]
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: " + message), proc.stderr


@reads("bad_epochs")
def test_a_bad_parameter_through_mlflow_run_fails_the_run(project):
    store, proc = project["bad_epochs"]
    assert proc.returncode != 0
    assert "error: epochs must be an integer >= 1, got 'two'\n" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: epochs")[0]
    run_id = re.search(r"Run \(ID '([0-9a-f]+)'\) failed", proc.stderr).group(1)
    assert store.client.get_run(run_id).info.status == "FAILED"


def test_the_projects_environment_shares_the_stores_schema():
    """`mlflow run .` creates the run in mlflow.db with the MLflow installed beside
    the project, and the entry points open it with python_env.yaml's: the two must
    be one minor version (an older one inside refuses the newer schema)."""
    import importlib.metadata
    import tomllib

    pinned = re.search(r"^\s*- mlflow==(\d+)\.(\d+)\.\d+\s*$",
                       (REPO / "python_env.yaml").read_text(), re.M)
    assert pinned, "python_env.yaml pins no mlflow==X.Y.Z"
    minor = tuple(map(int, pinned.groups()))
    installed = tuple(map(int, importlib.metadata.version("mlflow").split(".")[:2]))
    assert installed == minor
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [spec] = [d for d in project["dependencies"] if d.startswith("mlflow")]
    assert spec == f"mlflow>={minor[0]}.{minor[1]},<{minor[0]}.{minor[1] + 1}"
