"""What ``GapTracker`` costs: epoch times of five ways to train, interleaved in one run.

The reference case is the 20-layer MLP with BatchNormalization after each Dense
(``projects/deep_mlp.py``, ``bn=1``), batch size 32, on Fashion-MNIST's 60,000
training images (Debian's ``dataset-fashion-mnist``). Each variant runs in its own
long-lived worker process, one ``fit()`` over all the epochs, and waits at the
start of every epoch until the parent says "go"; the parent lets one worker run
one epoch at a time, A B C D E F A B C D E F ..., so the load of a shared machine
falls on every variant alike. An epoch is timed inside the worker from its first
batch to the start of the next epoch, so it includes every callback's epoch-end work.
The wait before the first batch, while Keras replaces the previous epoch's
``tf.data`` iterator, is reported apart ("epoch start"): a worker that sat idle
waiting for its turn stalls there, now and then, for about as long as it sat idle
(TensorFlow's input pipeline, in every variant, gaptrack or not; see
docs/performance.md, "Reading the figures"). Epoch 0 (tracing, run creation) is a
warm-up, left out of the medians and reported apart (``bench_first_use.py``
measures first use on its own).

- A: plain ``fit``;
- B: ``fit`` with ``mlflow.keras.autolog(log_models=False)`` (Keras 3's autolog);
- C: ``fit`` with a callback calling ``model.evaluate(x_train, y_train)`` (batch 32,
  evaluate's default) at every epoch end, as people do by hand;
- D: ``fit`` with ``GapTracker``: the whole training set as probe, every epoch
  measured, BN snapshots;
- E: ``fit`` with ``GapTracker`` at its defaults;
- F: E again, logging through a local HTTP proxy that holds every request 50 ms
  before forwarding it to a real ``mlflow server`` on 127.0.0.1: the requests it
  forwards per epoch are counted, and the time the training thread spends in the
  tracker's logging calls (``RunLogger``) is measured.

B, D and E log to a SQLite store in a temporary directory. Peak memory is each
worker's peak resident set (``getrusage``), so TensorFlow's allocations count.

Ratios of epoch medians carry a shared machine's noise (epochs of one variant vary
by 10-30%; B/A and F/E, whose first side does at least as much as the second, show
it), more than the few percent the targets leave. Each worker therefore also
measures its variant's own work: the time its callback's hooks take in the training
thread (wall time, TensorFlow's threads working for them included) and the CPU time
of its Python threads besides the main one (gaptrack's sender and image renderer,
MLflow's asynchronous logging). The "accounted" ratios put them on A's median
epoch: without the background CPU (as if it ran on a core that training leaves
idle) and with it counted as wall time (as if no core were idle), the bound the
targets are checked on; and again on A's fastest epoch, where a variant's own work,
which does not shrink with the epoch, weighs most.

Every variant runs on the Keras backend ``--backend`` names (TensorFlow by
default; JAX and PyTorch need ``pip install -e '.[jax]'`` / ``'.[torch]'``).

Usage:
    python benchmarks/bench_tracker.py            # 60,000 images, 9 rounds (~35 min on 2 cores)
    python benchmarks/bench_tracker.py --quick    # 6,000 images, a few minutes
    python benchmarks/bench_tracker.py --quick --backend jax --variants ACDE
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from _server import start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from proxy import SlowProxy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "A": "plain fit",
    "B": "fit + mlflow.keras.autolog(log_models=False)",
    "C": "fit + model.evaluate(x_train) each epoch",
    "D": "fit + GapTracker, full probe, snapshots",
    "E": "fit + GapTracker defaults",
    "F": "E, server 50 ms per request",
}
#: (ratio, numerator, denominator, target)
TARGETS = (("D/C", "D", "C", 1.25), ("E/A", "E", "A", 1.10), ("E/B", "E", "B", 1.05))
MEMORY_TARGET_MB = 150
REQUESTS_TARGET = 2
BLOCKING_TARGET_MS = 10
PROXY_DELAY_S = 0.050


# -- the worker: one variant, one fit(), one epoch per "go" -----------------------

def worker(variant, config):
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr

    def send(message):
        protocol.write(json.dumps(message) + "\n")

    os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
    import keras
    import mlflow

    import gaptrack
    from gaptrack import callback as gcallback
    from gaptrack.tracking import RunLogger

    import _case

    data = _case.data(config["samples"])
    x, y = data.x, data.y
    model = _case.model(data, depth=config["depth"])

    # Instrumentation: time spent in the training thread logging, and measuring.
    spent = {"logging": 0.0, "measure": 0.0, "hooks": 0.0}

    def timed(owner, name, bucket):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[bucket] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    for name in ("log_metrics", "log_table", "set_tags"):
        timed(RunLogger, name, "logging")
    timed(gcallback.Measurer, "measure", "measure")

    epochs = config["rounds"] + 1  # epoch 0 is the warm-up

    class Pace(keras.callbacks.Callback):
        """Waits for "go" at each epoch start; reports the previous epoch's time."""

        def __init__(self):
            super().__init__()
            self.start = None

        def on_epoch_begin(self, epoch, logs=None):
            now = time.perf_counter()
            if self.start is not None:
                self.report(epoch - 1, now, time.process_time())
            if epoch == epochs:  # the extra epoch only closes the last one: one batch
                self.model.stop_training = True
                return
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(1)
            spent.update(logging=0.0, measure=0.0, hooks=0.0)
            self.start = time.perf_counter()
            self.first = None
            self.wall = time.time()

        def on_train_batch_begin(self, batch, logs=None):
            if self.first is None:  # the epoch's time starts at its first batch
                self.first = time.perf_counter()
                self.cpu = time.process_time()

        def report(self, epoch, now, cpu):
            send({"epoch": epoch, "seconds": now - self.first, "cpu": cpu - self.cpu,
                  "start_gap": self.first - self.start, "background_cpu": background.read(),
                  "wall_start": self.wall, "wall_end": time.time(), **spent})

    class EvaluateTrain(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.evaluate(x, y, verbose=0)

    # The variant's own work in the training thread: every hook its callback runs
    # in an epoch (B's is the one autolog adds), in wall time, TensorFlow's
    # threads working for it included.
    for owner in (gaptrack.GapTracker, mlflow.keras.callback.MlflowCallback, EvaluateTrain):
        for name in HOOKS:
            if name in vars(owner):
                timed(owner, name, "hooks")
    background = BackgroundCPU()

    callbacks = [Pace()]
    if variant == "B":
        mlflow.keras.autolog(log_models=False)
    elif variant == "C":
        callbacks.append(EvaluateTrain())
    elif variant == "D":
        callbacks.append(gaptrack.GapTracker((x, y), batch_size=32, probe_size=len(x)))
    elif variant in ("E", "F"):
        callbacks.append(gaptrack.GapTracker((x, y), batch_size=32))
    send({"ready": True})
    model.fit(x, y, batch_size=32, epochs=epochs + 1, verbose=0, callbacks=callbacks)
    probe = callbacks[-1].probe.size if variant in "DEF" else None
    send({"done": True, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "probe_size": probe})


#: The callback hooks ``fit()`` calls within an epoch.
HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end",
         "on_batch_end")


class BackgroundCPU:
    """CPU time of the worker's Python threads besides the main one: the
    variant's background work (gaptrack's sender and image renderer, MLflow's
    asynchronous logging). TensorFlow's own threads are not Python threads.

    :meth:`read` returns the CPU seconds those threads used since the previous
    call, wherever it fell (an epoch's renders and requests run on while the
    worker waits for its next turn, so they show at its next report)."""

    def __init__(self):
        self._seen = {}
        self.read()

    def read(self):
        used = 0.0
        for thread in threading.enumerate():
            if thread is threading.main_thread() or thread.ident is None:
                continue
            try:
                now = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except OSError:  # it ended meanwhile
                continue
            before = self._seen.get(thread.ident, 0.0)
            used += now - (before if before <= now else 0.0)  # else a new thread, same id
            self._seen[thread.ident] = now
        return used


# -- the parent -----------------------------------------------------------------------

class Worker:
    def __init__(self, variant, config, env, directory):
        self.variant = variant
        directory.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", variant, "--config", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(directory / "worker.log", "w"),
            text=True, bufsize=1, cwd=directory, env=env)
        self.epochs = []

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} died (exit {self.proc.wait()})")
        return json.loads(line)

    def epoch(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.epochs.append(self.receive())


def environment(backend):
    import importlib

    import keras
    import mlflow

    # the module's own version: TensorFlow's distribution may be tensorflow-cpu
    version = importlib.import_module(backend).__version__
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"load average at start {os.getloadavg()[0]:.1f}; Python {platform.python_version()}, "
            f"keras {keras.__version__} on {backend} {version}, mlflow {mlflow.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="6,000 images and 5 measured epochs instead of 60,000 and 9")
    parser.add_argument("--rounds", type=int, help="measured epochs per variant")
    parser.add_argument("--variants", default="ABCDEF")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        choices=["tensorflow", "jax", "torch"], help="the Keras backend")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.config))

    samples, rounds = (6_000, 5) if args.quick else (60_000, 9)
    rounds = args.rounds or rounds
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracker-"))
    os.environ["KERAS_BACKEND"] = args.backend
    print(f"environment: {environment(args.backend)}")
    print(f"case: 20 x (Dense(100) -> BN -> ELU) MLP, batch 32, Fashion-MNIST {samples:,} "
          f"images, {rounds} measured epochs per variant after a warm-up, interleaved; "
          f"scratch {tmp}", flush=True)
    server = proxy = None
    workers = []
    try:
        if "F" in args.variants:
            server, url = start_server(tmp, f"sqlite:///{tmp / 'server.db'}")
            proxy = SlowProxy(urllib.parse.urlsplit(url).port, PROXY_DELAY_S)
        for v in args.variants:
            # Each worker runs in its own directory (SQLite's artifacts go to ./mlruns).
            uri = proxy.url if v == "F" else f"sqlite:///{tmp / v / 'mlflow.db'}"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                           filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                       GAPTRACK_SPOOL_DIR=str(tmp / v / "spool"), MLFLOW_DISABLE_TELEMETRY="true",
                       DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
            workers.append(Worker(v, {"samples": samples, "depth": 20, "rounds": rounds,
                                      "tracking_uri": uri}, env, tmp / v))
        for w in workers:
            w.receive()  # ready
        started = time.monotonic()
        for r in range(rounds + 1):
            for w in workers:
                w.epoch()
            print(f"round {r} ({'warm-up' if r == 0 else 'measured'}): " + "  ".join(
                f"{w.variant} {w.epochs[-1]['seconds']:.2f}s" for w in workers), flush=True)
        results = {}
        for w in workers:
            w.proc.stdin.close()
            done = w.receive()
            w.proc.wait()
            results[w.variant] = {"epochs": w.epochs[1:], "warmup": w.epochs[0], **done}
        print(f"interleaved run: {time.monotonic() - started:.0f} s")
        report(results, proxy)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        if server is not None:
            stop_server(server)


def report(results, proxy):
    median = {v: statistics.median(e["seconds"] for e in r["epochs"]) for v, r in results.items()}
    cpu = {v: statistics.median(e["cpu"] for e in r["epochs"]) for v, r in results.items()}
    labels = {v: f"{v}: {VARIANTS[v]}" + (f" (probe {r['probe_size']:,})" if r.get("probe_size")
                                         else "") for v, r in results.items()}
    width = max(map(len, labels.values()))
    print()
    print(f"{'variant':<{width}} {'median s':>9} {'CPU s':>6} {'peak RSS MB':>12}  epochs s")
    for v, r in results.items():
        times = " ".join(f"{e['seconds']:.2f}" for e in r["epochs"])
        print(f"{labels[v]:<{width}} {median[v]:>9.2f} {cpu[v]:>6.1f} {r['peak_rss_mb']:>12.0f}  "
              f"{times}")
    print("(CPU s: median CPU time of the worker process per epoch, all threads; an epoch\n"
          " much longer than its variant's median at the usual CPU time was waiting, not working)")
    print("epoch start (before the first batch, left out of the times above): " + "  ".join(
        f"{v} median {1000 * statistics.median(e['start_gap'] for e in r['epochs']):.0f} ms, "
        f"max {max(e['start_gap'] for e in r['epochs']):.1f} s, "
        f"{sum(e['start_gap'] > 1 for e in r['epochs'])} over 1 s"
        for v, r in results.items()))
    # The warm-up epoch, left out above: tracing (fit's and the tracker's), run creation.
    print("warm-up epoch 0: " + "  ".join(
        f"{v} {r['warmup']['seconds']:.2f} s (CPU {r['warmup']['cpu']:.1f}"
        + (f", measuring {r['warmup']['measure']:.2f} s" if v in "DEF" else "") + ")"
        for v, r in results.items()))
    if "D" in results and "C" in results:
        d, c = results["D"]["warmup"], results["C"]["warmup"]
        print(f"warm-up epoch D/C = {d['seconds'] / c['seconds']:.3f} "
              f"[CPU time: {d['cpu'] / c['cpu']:.3f}]  (see bench_first_use.py)")
    print()
    whole = {v: statistics.median(e["seconds"] + e["start_gap"] for e in r["epochs"])
             for v, r in results.items()}
    for name, a, b, target in TARGETS:
        if a in median and b in median:
            ratio = median[a] / median[b]
            print(f"{name} = {ratio:.3f}  (target <= {target:.2f})  "
                  f"{'PASS' if ratio <= target else 'FAIL'}   "
                  f"[CPU time: {cpu[a] / cpu[b]:.3f}; with the epoch start: "
                  f"{whole[a] / whole[b]:.3f}; epoch medians, the machine's noise included: "
                  "the accounted ratios below are the check]")
    accounted(results, median)
    if "D" in results and "A" in results:
        extra = results["D"]["peak_rss_mb"] - results["A"]["peak_rss_mb"]
        print(f"peak RSS D - A = {extra:.0f} MB  (target <= {MEMORY_TARGET_MB})  "
              f"{'PASS' if extra <= MEMORY_TARGET_MB else 'FAIL'}")
    for v in "DEF":
        if v in results:
            e = results[v]["epochs"]
            print(f"{v}: per epoch, measuring {statistics.median(x['measure'] for x in e):.2f} s, "
                  f"logging calls in the training thread "
                  f"{1000 * statistics.median(x['logging'] for x in e):.1f} ms")
    if "F" in results and proxy is not None:
        e = results["F"]["epochs"]
        # An epoch's requests are sent after its end (while the worker waits or the
        # next epoch runs): count from the end of the warm-up to the end of the last
        # measured epoch, i.e. the requests of len(e) epoch ends.
        low, high = results["F"]["warmup"]["wall_end"], e[-1]["wall_end"]
        window = [(m, p) for t, m, p in proxy.requests if low <= t < high]
        kinds = {}
        for m, p in window:
            if "/mlflow-artifacts/" in p:  # files: the epoch images, the BN snapshot
                what = "epoch image or its preview" if "/images/" in p else "BN snapshot"
                p = f"/api/2.0/mlflow-artifacts/artifacts/... ({what})"
            kinds[f"{m} {p}"] = kinds.get(f"{m} {p}", 0) + 1
        artifacts = sum(n for k, n in kinds.items() if "mlflow-artifacts" in k)
        per_epoch = (len(window) - artifacts) / len(e)
        blocking = 1000 * statistics.median(x["logging"] for x in e)
        print(f"F: requests per epoch through the 50 ms proxy: {len(window) / len(e):.1f} "
              f"({per_epoch:.1f} to the tracking API, besides the files; "
              f"target <= {REQUESTS_TARGET}) "
              f"{'PASS' if per_epoch <= REQUESTS_TARGET else 'FAIL'}")
        for k, n in sorted(kinds.items()):
            print(f"     {n / len(e):.1f}/epoch  {k}")
        if "E" in results:  # the same tracker logging to SQLite: the server's share
            local = 1000 * statistics.median(x["logging"] for x in results["E"]["epochs"])
            added = blocking - local
            print(f"F: training thread in logging calls {blocking:.1f} ms/epoch with a 50 ms "
                  f"server, {local:.1f} ms with SQLite (E): the server adds {added:+.1f} ms/epoch "
                  f"(target < {BLOCKING_TARGET_MS})  "
                  f"{'PASS' if added < BLOCKING_TARGET_MS else 'FAIL'}")
            print(f"F - E median epoch: {1000 * (median['F'] - median['E']):+.0f} ms "
                  "(noise of a shared machine included)")


def accounted(results, median):
    """The ratios from each variant's own work, measured inside its process.

    A variant's epoch is A's training plus its own work: its callback's hooks in
    the training thread (wall time, TensorFlow's threads working for them
    included) and the CPU time of its background threads. The ratios are printed
    twice: with the hooks alone (as if the background threads ran on a core
    training leaves idle) and with the background CPU added as wall time (as if
    no core were idle: the upper bound, which the targets are checked on).
    Ratios of epoch medians carry the machine's noise (epochs of one variant
    vary by 10-30% on a shared machine); these carry only A's, in the share."""
    if "A" not in median:
        return
    base = median["A"]
    hooks, background = {}, {}
    for v, r in results.items():
        hooks[v] = statistics.median(e["hooks"] for e in r["epochs"])
        background[v] = statistics.median(e["background_cpu"] for e in r["epochs"])
        if v != "A":
            print(f"{v}: own work per epoch: hooks in the training thread {hooks[v]:.3f} s "
                  f"({100 * hooks[v] / base:.1f}% of A's median epoch), background threads' "
                  f"CPU {background[v]:.3f} s ({100 * background[v] / base:.1f}%)")
    noise = [f"{a}/{b} = {median[a] / median[b]:.3f}" for a, b in (("B", "A"), ("F", "E"))
             if a in median and b in median]
    print(f"accounted ratios: (A's median epoch {base:.2f} s + the variant's own work) against "
          "the same for the other" + (f"; the epoch medians' noise: {', '.join(noise)}, where "
                                      "the first does at least as much as the second" if noise
                                      else ""))
    # A variant's own work does not shrink with the epoch: the ratios are highest
    # on A's fastest epoch, checked there too.
    fastest = min(e["seconds"] for e in results["A"]["epochs"])
    for epoch, label in ((base, ""), (fastest, f" at A's fastest epoch ({fastest:.2f} s)")):
        for name, a, b, target in TARGETS:
            if a in hooks and b in hooks:
                low = (epoch + hooks[a]) / (epoch + hooks[b])
                high = (epoch + hooks[a] + background[a]) / (epoch + hooks[b] + background[b])
                print(f"  accounted {name}{label} = {high:.3f} with the background CPU as wall "
                      f"time, {low:.3f} without  (target <= {target:.2f})  "
                      f"{'PASS' if high <= target else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
