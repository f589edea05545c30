"""What gaptrack costs the first time: tracing, ``measure()`` in a loop, short runs.

The case of ``bench_tracker.py``: the 20-layer MLP with BatchNormalization after
each Dense (``projects/deep_mlp.py``, ``bn=1``), batch size 32, 6,000
Fashion-MNIST training images. Everything runs in this one process, the two
sides of each ratio side by side, their order alternating from round to round,
so that the load of a shared machine falls on both alike. Wall time and CPU time
(``time.process_time``, all threads) are reported; on a loaded machine the CPU
ratio is the steadier one.

1. **First call.** Per round, a fresh model fitted for one epoch; then the first
   ``gaptrack.measure(model, data, batch_size=32)`` and the first
   ``model.evaluate(data, batch_size=32)`` on it: each traces its functions.
2. **Later calls.** On one model, ``measure()`` and a warm ``evaluate()``
   alternately, ten times each, counting the traces of gaptrack's passes and
   TensorFlow's "triggered tf.function retracing" warnings.
3. **A short run.** Per round, a fresh model and a 2-epoch ``fit`` with
   ``GapTracker`` (the whole training set as probe, every epoch, BN snapshots,
   logging to SQLite) against the same ``fit`` calling ``evaluate`` by hand at
   each epoch end: tracing, run creation and the train-end report included.

Usage:
    python benchmarks/bench_first_use.py              # 3 rounds (~5 min on 2 loaded cores)
    python benchmarks/bench_first_use.py --rounds 5
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: (what, target ratio)
TARGETS = {"first": 2.0, "later": 1.0, "fit": 1.25}
BATCH_SIZE = 32
SAMPLES = 6_000
CALLS = 10


def timed(function):
    """``(wall s, CPU s)`` of ``function()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


class RetracingCounter(logging.Handler):
    """Counts TensorFlow's "triggered tf.function retracing" warnings."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += "triggered tf.function retracing" in record.getMessage()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of parts 1 and 3")
    args = parser.parse_args()

    import keras
    import mlflow
    import tensorflow as tf

    import gaptrack
    from gaptrack.measurement import Measurer
    from gaptrack.probe import Probe
    import _case

    tmp = Path(tempfile.mkdtemp(prefix="bench-first-use-"))
    os.environ["GAPTRACK_SPOOL_DIR"] = str(tmp / "spool")
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    data = _case.data(SAMPLES)
    x, y = data.x, data.y
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{SAMPLES:,} Fashion-MNIST images, batch {BATCH_SIZE}, {args.rounds} rounds",
          flush=True)

    def fresh(epochs=0):
        model = _case.model(data)
        if epochs:
            model.fit(x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
        return model

    def measure(model):
        return gaptrack.measure(model, (x, y), batch_size=BATCH_SIZE, probe_size=len(x))

    def evaluate(model):
        return model.evaluate(x, y, batch_size=BATCH_SIZE, verbose=0)

    ratios = {}

    # 1. The first call of each, on a fitted model.
    first = {"measure": [], "evaluate": []}
    for r in range(args.rounds):
        model = fresh(epochs=1)
        order = ("measure", "evaluate") if r % 2 else ("evaluate", "measure")
        for name in order:
            first[name].append(timed(lambda: (measure if name == "measure" else evaluate)(model)))
        print(f"first call, round {r}: " + "  ".join(
            f"{n} {first[n][-1][0]:.2f} s (CPU {first[n][-1][1]:.2f})" for n in order), flush=True)
    ratios["first"] = report("first measure() / first evaluate()", first)

    # 2. Later calls on one model.
    counter = RetracingCounter()
    tf.get_logger().addHandler(counter)
    later = {"measure": [], "evaluate": []}
    for _ in range(CALLS):
        later["measure"].append(timed(lambda: measure(model)))
        later["evaluate"].append(timed(lambda: evaluate(model)))
    tf.get_logger().removeHandler(counter)
    passes = Measurer(model, BATCH_SIZE)._compiled(Probe.from_data((x, y), probe_size=len(x)))
    ratios["later"] = report(f"{CALLS} later measure() / warm evaluate()", later)
    print(f"  traces over all the calls on this model: {passes.traces}; retracing warnings "
          f"during the {CALLS} calls: {counter.count}")

    # 3. A 2-epoch fit, tracing included.
    class EvaluateTrain(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            evaluate(self.model)

    def fit(callback):
        model = fresh()
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=2, verbose=0, callbacks=[callback])

    def tracker():
        return gaptrack.GapTracker((x, y), batch_size=BATCH_SIZE, probe_size=len(x))

    fit(tracker())  # the SQLite store and MLflow's first run, not part of either
    fits = {"GapTracker": [], "evaluate": []}
    for r in range(args.rounds):
        order = ("GapTracker", "evaluate") if r % 2 else ("evaluate", "GapTracker")
        for name in order:
            fits[name].append(timed(lambda: fit(tracker() if name == "GapTracker"
                                                else EvaluateTrain())))
        print(f"2-epoch fit, round {r}: " + "  ".join(
            f"{n} {fits[n][-1][0]:.2f} s (CPU {fits[n][-1][1]:.2f})" for n in order), flush=True)
    ratios["fit"] = report("2-epoch fit with GapTracker / with evaluate() each epoch", fits)

    print()
    for key, (wall, cpu) in ratios.items():
        print(f"{key}: {wall:.2f} (CPU time {cpu:.2f})  target <= {TARGETS[key]:.2f}  "
              f"{'PASS' if wall <= TARGETS[key] else 'FAIL'}")


def report(what, times):
    """Prints and returns ``(wall, CPU)`` ratios of the medians of the two sides."""
    (a, side_a), (b, side_b) = times.items()
    medians = [[statistics.median(t[i] for t in side) for i in (0, 1)]
               for side in (side_a, side_b)]
    ratio = (medians[0][0] / medians[1][0], medians[0][1] / medians[1][1])
    print(f"{what}: median {a} {medians[0][0]:.2f} s (CPU {medians[0][1]:.2f}), "
          f"{b} {medians[1][0]:.2f} s (CPU {medians[1][1]:.2f}): ratio {ratio[0]:.2f} "
          f"(CPU time {ratio[1]:.2f})", flush=True)
    return ratio


if __name__ == "__main__":
    sys.exit(main())
