"""Session fixtures: a sandboxed home, a real ``mlflow server`` and SQLite stores.

Nothing is written into ``~`` and nothing reaches the internet: the environment
variables below are set before Keras, TensorFlow or MLflow are imported.
"""

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import urllib.request
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="gaptrack-tests-"))
for _var, _sub in (("KERAS_HOME", "keras"), ("XDG_CONFIG_HOME", "config"),
                   ("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "cache")):
    os.environ[_var] = str(_SANDBOX / _sub)
    (_SANDBOX / _sub).mkdir(parents=True, exist_ok=True)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["GAPTRACK_SPOOL_DIR"] = str(_SANDBOX / "spool")
os.environ["DO_NOT_TRACK"] = "true"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["MPLBACKEND"] = "Agg"
# the tracker's failures raise instead of warning (gaptrack.safety), so no bug hides
os.environ["GAPTRACK_TESTING"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
os.environ.pop("MLFLOW_EXPERIMENT_ID", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url, timeout=60.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class MlflowServer:
    """A real ``mlflow server`` subprocess on 127.0.0.1 over a SQLite store.

    It runs without the server's job runner: MLflow's GenAI jobs, which gaptrack
    does not use, run in seven Huey consumer processes that each import MLflow. It
    made a start cost 41 CPU-seconds instead of 8 on this 2-core machine; the
    tracking API is the same.
    """

    def __init__(self, root, port=None, extra_args=()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, timeout=90.0):
        return self.launch().wait_ready(timeout)

    def launch(self):
        """Start the server process, without waiting for it to answer."""
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", self.backend_uri,
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", *self.extra_args],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ,
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        return self

    def wait_ready(self, timeout=90.0):
        """Wait until the launched server answers (raises if it exited or did not)."""
        wait_for_http(self.url + "/health", timeout=timeout, proc=self.proc)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self.proc = None


#: Seconds within which the first failed request of an outage is a warning.
WARNING_LATENCY = 15.0


@contextlib.contextmanager
def timed_warnings():
    """``[(monotonic time, category, text)]`` of every warning, from any thread."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *_, **__: seen.append(
            (time.monotonic(), category, str(message)))
        yield seen


def first_tracking_warning(seen, after, timeout):
    """Seconds from ``after`` to the first TrackingWarning issued after it, waiting
    at most ``timeout`` seconds for it (``None``: none came)."""
    deadline = time.monotonic() + timeout
    while True:
        times = [t for t, category, _ in seen
                 if category.__name__ == "TrackingWarning" and t >= after]
        if times:
            return times[0] - after
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def recoveries(caplog):
    """The log lines saying that the tracking server answers again."""
    return [r for r in caplog.records
            if r.name == "gaptrack.sender" and "answers again" in r.getMessage()]


def _forget_mlflow_state():
    """Drop MLflow's process-wide fluent state (active runs, the experiment set
    by ``set_experiment``) so that one test's store does not leak into the next."""
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run():
        mlflow.end_run()
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _own_spool(tmp_path, monkeypatch):
    """Each test spools into its own directory (the tracker's outbox)."""
    monkeypatch.setenv("GAPTRACK_SPOOL_DIR", str(tmp_path / "spool"))


_SESSION_SERVER = None
_SESSION_SERVER_LOCK = threading.Lock()


def session_server():
    """The session's tracking server, launched at the first call (not waited
    for: :meth:`MlflowServer.wait_ready`)."""
    global _SESSION_SERVER
    with _SESSION_SERVER_LOCK:
        if _SESSION_SERVER is None:
            _SESSION_SERVER = MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-server-",
                                                                 dir=_SANDBOX))).launch()
            atexit.register(_SESSION_SERVER.stop)
    return _SESSION_SERVER


@pytest.fixture(scope="session")
def mlflow_server():
    """One real tracking server for the whole session (startup takes ~10 s),
    launched at the session's start when a test started ahead needs it."""
    server = session_server().wait_ready()
    yield server
    server.stop()


# --- Subprocesses started ahead -------------------------------------------------
#
# A test module whose tests wait for subprocesses (``mlflow run``, a strategy's
# processes) may define ``launch_ahead(items)``: it is called with the module's
# selected tests when the session starts and starts those subprocesses in the
# background, so that they run while the tests before them do.

#: Their niceness: below the suite's own process, which runs the tests in order,
#: and above the backend runs (niceness 19), which are needed only at the end.
AHEAD_NICENESS = 10


def niced(command, niceness=AHEAD_NICENESS):
    """``command`` run at ``niceness``."""
    return ["nice", "-n", str(niceness), *command]


def sandbox_folder(prefix):
    """A new folder in the session's sandbox (for what starts before any fixture)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_SANDBOX))


def _launch_ahead(items):
    modules = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "launch_ahead"):
            modules.setdefault(module, []).append(item)
    for module, selected in modules.items():
        module.launch_ahead(selected)


@pytest.fixture(scope="session")
def _empty_sqlite_store(tmp_path_factory):
    """An initialised, empty SQLite store (creating one runs MLflow's schema
    migrations, ~3 s); tests get a copy of the file."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("sqlite-template")
    path = folder / "mlflow.db"
    cwd = os.getcwd()
    os.chdir(folder)  # the Default experiment's artifact root is made from the cwd
    try:
        MlflowClient(f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch, _empty_sqlite_store):
    """A fresh SQLite tracking store; the working directory is moved into
    ``tmp_path`` so that MLflow's cwd-relative artifact root lands there too."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(_empty_sqlite_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow

    _forget_mlflow_state()
    mlflow.set_tracking_uri(uri)
    yield uri
    _forget_mlflow_state()


@pytest.fixture
def server_uri(mlflow_server, tmp_path, monkeypatch):
    """The session server as this test's tracking URI."""
    monkeypatch.chdir(tmp_path)
    import mlflow

    _forget_mlflow_state()
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    _forget_mlflow_state()


# --- Keras backends -----------------------------------------------------------
#
# The suite runs on the default backend, TensorFlow. ``tests/test_backends.py``
# runs the contract modules below on JAX and PyTorch too, and
# ``tests/no_tensorflow.py`` on each, every one in a subprocess that starts in
# the background when the session starts (at the lowest CPU priority: most of
# the suite keeps one core busy, they use the other) and that its test waits for
# at the end of the session.

#: The modules whose tests hold on every backend.
CONTRACT_MODULES = ("tests/test_measurement.py", "tests/test_callback.py",
                    "tests/test_autologging.py", "tests/test_snapshots.py",
                    "tests/test_recalibrate.py")
#: The other backends the contract modules run on.
OTHER_BACKENDS = ("jax", "torch")
#: Whether the backend runs go one after the other (else both at once): beside
#: tests/test_reliability.py and test_tracking.py (175 s alone), in series 320 and
#: 328 s, both at once 344 and 327 s, with those tests slowed more.
BACKEND_RUNS_IN_SERIES = True


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorflow_only(reason): the test needs TensorFlow itself (not only as a "
        "Keras backend); skipped on the other backends with 'TensorFlow only: <reason>'")
    config.addinivalue_line(
        "markers", "backend_independent: the test exercises MLflow tracking only, no Keras "
        "computation, so the runs on other backends leave it out")


def keras_backend():
    import keras

    return keras.backend.backend()


def pytest_collection_modifyitems(config, items):
    """TensorFlow-only tests are skipped on the other backends, and the backend
    tests go last (they wait for their background runs)."""
    tensorflow_only = [item for item in items if item.get_closest_marker("tensorflow_only")]
    if tensorflow_only and keras_backend() != "tensorflow":
        for item in tensorflow_only:
            marker = item.get_closest_marker("tensorflow_only")
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow only: {reason}"))
    items.sort(key=lambda item: item.path.name == "test_backends.py")


#: What a background run on another backend runs: the contract modules' pytest
#: run, or ``tests/no_tensorflow.py`` (gaptrack's whole path, without TensorFlow).
CONTRACT, NO_TENSORFLOW = "contract", "no_tensorflow"


class BackendRun:
    """A run on ``backend`` in a subprocess (its output in :attr:`log`): the
    contract modules' pytest run (``kind`` :data:`CONTRACT`, its JUnit XML in
    :attr:`junit`), or ``tests/no_tensorflow.py`` (:data:`NO_TENSORFLOW`, what
    it writes in :attr:`out`)."""

    def __init__(self, backend, folder, kind=CONTRACT):
        self.backend = backend
        self.kind = kind
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "output.txt"
        self.junit = self.folder / "junit.xml"
        self.out = self.folder / "out.json"
        self.proc = None
        self.returncode = None
        self.seconds = None
        self.cancelled = False
        self._done = threading.Event()
        #: The sandbox's environment as the run was set up (at the session's
        #: start): a run that starts later, while a test has variables of its own
        #: set (its spool, an experiment id), must not inherit them.
        self._environ = dict(os.environ)

    def command(self):
        if self.kind == NO_TENSORFLOW:
            return niced([sys.executable, str(REPO / "tests" / "no_tensorflow.py"),
                          f"sqlite:///{self.folder / 'mlflow.db'}", str(self.out)], 19)
        return niced([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                      f"--junitxml={self.junit}", f"--basetemp={self.folder / 'tmp'}",
                      "-m", "not backend_independent", "-q", *CONTRACT_MODULES], 19)

    def environment(self):
        """The sandbox's environment, on :attr:`backend`. On JAX, compiled programs
        are cached in the run's folder: the tests' many identical small models
        compile once (107 s instead of 127 s for the run on an idle machine); and
        XLA compiles them without LLVM's costlier optimisations, which these tiny
        models' programs do not repay (the run took 149 CPU-seconds instead of 178)."""
        env = {**self._environ, "KERAS_BACKEND": self.backend}
        if self.backend == "jax":
            env.update(JAX_COMPILATION_CACHE_DIR=str(self.folder / "jax-cache"),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                       XLA_FLAGS=" ".join(filter(None, (
                           env.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                           "--xla_llvm_disable_expensive_passes=true"))))
        return env

    def start(self):
        """Run the subprocess to its end (it inherits the sandbox's environment);
        nothing once :meth:`kill` was called."""
        started = time.monotonic()
        with _BACKEND_RUNS_LOCK:
            if not self.cancelled:
                with open(self.log, "wb") as log:
                    self.proc = subprocess.Popen(
                        self.command(), cwd=REPO if self.kind == CONTRACT else self.folder,
                        env=self.environment(),
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        # a process group of its own, to end it whole; not a session
                        # of its own: with Linux's autogroups a session is scheduled
                        # as one unit against the suite's, whatever its niceness
                        process_group=0)
        if self.proc is not None:
            self.returncode = self.proc.wait()
            self.seconds = time.monotonic() - started
        self._done.set()

    def wait(self, timeout):
        """The exit code, once the run ended (``None``: still running after ``timeout`` s)."""
        self._done.wait(timeout)
        return self.returncode

    def output_tail(self, lines=60):
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no output)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self):
        """End the run (its whole process group), or keep it from starting."""
        with _BACKEND_RUNS_LOCK:
            self.cancelled = True
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)


#: ``{(kind, backend): BackendRun}`` of this session.
_BACKEND_RUNS = {}
_BACKEND_RUNS_LOCK = threading.Lock()


def _start_backend_runs(wanted):
    """Start the runs ``wanted`` (``[(kind, backend)]``) in a background thread:
    one after the other (:data:`BACKEND_RUNS_IN_SERIES`) or each at once."""
    folder = Path(tempfile.mkdtemp(prefix="backend-runs-", dir=_SANDBOX))
    runs = [_BACKEND_RUNS.setdefault((kind, backend),
                                     BackendRun(backend, folder / f"{kind}-{backend}", kind))
            for kind, backend in wanted]
    groups = [runs] if BACKEND_RUNS_IN_SERIES else [[run] for run in runs]
    for group in groups:
        threading.Thread(target=lambda group=group: [run.start() for run in group],
                         name="backend-runs", daemon=True).start()


def _stop_backend_runs():
    for run in _BACKEND_RUNS.values():
        run.kill()


atexit.register(_stop_backend_runs)


def backend_run(backend, kind=CONTRACT):
    """The run of ``kind`` on ``backend``: started at session start when its test
    was collected, or now."""
    if (kind, backend) not in _BACKEND_RUNS:
        _start_backend_runs([(kind, backend)])
    return _BACKEND_RUNS[kind, backend]


#: The tests of ``tests/test_backends.py`` that wait for a background run.
_BACKEND_TESTS = {"test_the_contract_tests_pass_on_backend": CONTRACT,
                  "test_no_tensorflow_import_on_backend": NO_TENSORFLOW}


def pytest_collection_finish(session):
    """Start what the selected tests will wait for, so that it runs while the
    tests before them do: the modules' ``launch_ahead`` and the background runs
    of the backend tests."""
    wanted = [(_BACKEND_TESTS[item.originalname], item.callspec.params["backend"])
              for item in session.items
              if item.path.name == "test_backends.py" and item.originalname in _BACKEND_TESTS]
    if session.config.option.collectonly:
        return
    _launch_ahead(session.items)
    if wanted and keras_backend() == "tensorflow":
        _start_backend_runs(sorted(wanted))  # the contract runs first: they are the longest


def pytest_sessionfinish(session, exitstatus):
    _stop_backend_runs()


@pytest.fixture(scope="session", autouse=True)
def _keras_backend_property(request, record_testsuite_property):
    """The JUnit XML says which backend the session ran on."""
    if request.config.option.xmlpath:
        record_testsuite_property("keras_backend", keras_backend())
