"""One tracked training in its own process, for the concurrency, auth and kill tests.

Usage: python worker.py SEED OUT.json [own]  (tracking URI from MLFLOW_TRACKING_URI)
With ``own`` the tracker creates the run itself; otherwise the worker starts it
and logs a param. Writes the History, the run id and gaptrack's warnings to OUT.json.

:func:`start` runs it in a process forked from a server process that imported
Keras, TensorFlow, MLflow and gaptrack once (``multiprocessing``'s forkserver; its
only other threads then are three idle native ones, of OpenBLAS, jemalloc and
TensorFlow's import, and no Python thread): a fresh interpreter spends 7 of
a worker's 15 CPU-seconds importing them, and the reliability tests start 14
workers on 2 cores. Each worker is still a process of its own, with its own
environment, working directory, MLflow client and connections.
"""

import functools
import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import mlflow  # noqa: E402

import gaptrack  # noqa: E402
from builders import blobs, mlp  # noqa: E402


def main(seed, out, own=False):
    keras.utils.set_random_seed(seed)
    x, y = blobs(64 + 8 * seed, seed=seed)
    model = mlp(bn=seed % 2 == 0, dropout=0.2 if seed % 2 else 0.0)
    tracker = gaptrack.GapTracker((x, y), batch_size=16, close_timeout=120.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if own:
            history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[tracker])
            run_id = tracker.run_id
        else:
            with mlflow.start_run(run_name=f"worker-{seed}") as run:
                mlflow.log_param("seed", seed)
                history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                                    callbacks=[tracker])
            run_id = run.info.run_id
    with open(out, "w") as f:
        json.dump({"run_id": run_id, "history": history.history,
                   "probe_size": len(x),
                   "warnings": [str(w.message) for w in caught
                                if issubclass(w.category, gaptrack.tracking.TrackingWarning)]}, f)


def train_until_killed(seed, progress):
    """Train a tracked model (its own run) for as many epochs as it is given
    time; after the tracker's ``on_epoch_end``, each epoch appends
    ``epoch loss`` to ``progress`` (the page cache keeps it when the process is
    killed)."""
    keras.utils.set_random_seed(seed)
    x, y = blobs(48, seed=seed)

    def done(epoch, logs):
        with open(progress, "a") as f:
            f.write(f"{epoch} {logs['loss']!r}\n")

    mlp(bn=True).fit(x, y, batch_size=16, epochs=10_000, verbose=0, callbacks=[
        gaptrack.GapTracker((x, y), batch_size=16),
        keras.callbacks.LambdaCallback(on_epoch_end=done)])


class Worker:
    """A started worker (:func:`start`): :attr:`output` once :meth:`wait` returned."""

    def __init__(self, process, log):
        self.process = process
        self.log = log
        self.output = None
        self.returncode = None

    def wait(self, timeout):
        """Wait at most ``timeout`` seconds for the worker's end; its exit code
        (``None``: it had not ended, and is killed)."""
        self.process.join(timeout)
        self.returncode = self.process.exitcode
        if self.returncode is None:
            self.process.kill()
            self.process.join()
        self.output = self.log.read_text(errors="replace") if self.log.exists() else ""
        return self.returncode


_CONTEXT = None


def start(seed, out, env, cwd, own=False, target=None):
    """:func:`main` (or ``target(seed, out)``) in a new process, given the whole
    environment ``env`` and the working directory ``cwd``; its output (stdout and
    stderr) goes to a file beside ``out``."""
    import multiprocessing

    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["worker"])
    log = out.with_suffix(".log")
    call = target or functools.partial(main, own=own)
    process = _CONTEXT.Process(target=_run, args=(call, seed, str(out), dict(env), str(cwd),
                                                  str(log)), daemon=True)
    process.start()
    return Worker(process, log)


def _run(call, seed, out, env, cwd, log):
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    with open(log, "wb", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    call(seed, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], own=sys.argv[3:] == ["own"])
