"""What ``GapTracker`` does per measured epoch besides the probe's passes, on a large model.

The model is ``keras.applications.ConvNeXtBase`` (``weights=None``: 88 M
parameters, randomly initialised; nothing is downloaded), trained ``--epochs``
epochs on ``--images`` random images of ``--size`` pixels square, batch
``--batch-size``. Each variant runs in its own process, so that its peak resident
set (``getrusage``) is its own:

- ``plain``: ``fit`` alone;
- ``tracked``: ``fit`` with ``GapTracker`` at its defaults (the images are the
  probe), logging to a SQLite store in a temporary directory.

On a shared machine one epoch's figures carry its load; the reading of the
weights is therefore also timed alone, ``--reads`` times after the fit (median and
fastest printed).

For every measured epoch the tracked worker splits the tracker's ``on_epoch_end``
(wall time in the training thread) into the probe's passes
(``Measurer.train_mode_pass`` and ``Measurer.inference_pass``, tracing included)
and the rest: reading the weights (fingerprint and finiteness of a sample:
``gaptrack.weights.digest``; before it, ``_fingerprint`` and ``_finite_weights``),
the decomposition, the BN snapshot, queuing the images and the metrics. It also
prints the CPU time of its Python threads besides the main one (the image
renderer and the sender work there, while training goes on), and each worker's
resident set per phase (sampled every 2 ms: at the phase's first entry and its
peak), which says where the tracker's memory goes.

``--gaptrack DIR`` runs the workers on the gaptrack of another checkout (the
main branch, to compare with what it did before).

Usage:
    python benchmarks/bench_scale.py                  # 64 images of 64 px, 2 epochs
    python benchmarks/bench_scale.py --gaptrack /path/to/another/checkout
    python benchmarks/bench_scale.py --variants tracked   # its phases alone, as JSON
    python benchmarks/bench_scale.py --size 224 --images 64
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: What the target allows the tracker per measured epoch outside the passes.
TARGET_MS = 50.0


class Phases:
    """The worker's resident set, sampled every 2 ms from ``/proc/self/statm``:
    per phase, the resident set when it was first entered and the peak while in it."""

    def __init__(self):
        self.phase, self.entered, self.peaks = "setup", {"setup": self.rss()}, {}
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def enter(self, phase):
        """Count from now on under ``phase``; the phase it was in."""
        outer, self.phase = self.phase, phase
        self.entered.setdefault(phase, self.rss())
        self._note(outer)
        return outer

    def _note(self, phase):
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), self.rss())

    def _sample(self):
        while self._running:
            self._note(self.phase)
            time.sleep(0.002)

    def stop(self):
        """``{phase: [MB at entry, peak MB]}``, in the order first entered."""
        self._running = False
        self._thread.join()
        self._note(self.phase)
        return {p: [mb, self.peaks.get(p, mb)] for p, mb in self.entered.items()}


def worker(args):
    """Train one variant; print one JSON line of figures."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.tmp}/mlflow.db")
    phases = Phases()
    import keras
    import numpy as np

    import gaptrack
    from bench_tracker import BackgroundCPU

    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtBase(weights=None, input_shape=(args.size, args.size, 3),
                                            classes=10)
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(args.images, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, size=args.images)
    spent = {"passes": 0.0, "weights": 0.0}
    epochs = []
    phases.enter("fit")

    def timed(owner, name, bucket, phase):
        """``owner.name`` wrapped: its wall time added to ``spent[bucket]`` (unless
        ``None``), and the memory it takes counted under ``phase``."""
        original = getattr(owner, name)

        def wrapper(*a, **k):
            start, outer = time.perf_counter(), phases.enter(phase)
            try:
                return original(*a, **k)
            finally:
                if bucket:
                    spent[bucket] += time.perf_counter() - start
                phases.enter(outer)
        setattr(owner, name, wrapper)

    from gaptrack import callback, measurement

    callbacks = []
    if args.variant == "tracked":
        for owner, name, bucket, phase in (
                (measurement.Measurer, "train_mode_pass", "passes", "tracker: the passes"),
                (measurement.Measurer, "inference_pass", "passes", "tracker: the passes"),
                (callback, "digest", "weights", "tracker: weights"),  # this branch
                (measurement, "digest", "weights", "tracker: weights"),
                (callback, "_fingerprint", "weights", "tracker: weights"),  # before it
                (measurement, "_finite_weights", "weights", "tracker: weights"),
                (measurement, "check_labels", None, "tracker: labels check"),
                (measurement, "_batching_matters", None, "tracker: batching check"),
                (callback, "add_measurement", None, "tracker: decomposition"),
                (gaptrack.GapTracker, "on_train_begin", None, "tracker: train begin"),
                (gaptrack.GapTracker, "on_train_end", None, "tracker: train end")):
            if hasattr(owner, name):  # the names of this checkout, or of an earlier one
                timed(owner, name, bucket, phase)
        epoch_end = gaptrack.GapTracker.on_epoch_end
        background = BackgroundCPU()

        def on_epoch_end(self, epoch, logs=None):
            spent.update(passes=0.0, weights=0.0)
            start, outer = time.perf_counter(), phases.enter("tracker: epoch end, besides the passes")
            epoch_end(self, epoch, logs)
            phases.enter(outer)
            total = time.perf_counter() - start
            epochs.append({"epoch": epoch, "total": total, **spent,
                           "background_cpu": background.read()})
        gaptrack.GapTracker.on_epoch_end = on_epoch_end
        callbacks.append(gaptrack.GapTracker((x, y), batch_size=args.batch_size))
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0,
              callbacks=callbacks)
    fit_s = time.perf_counter() - start
    phases.enter("after the fit")
    reads = []  # the weights' reading alone, after the fit: less noise than one epoch's
    if args.variant == "tracked":
        for _ in range(args.reads):
            start = time.perf_counter()
            if hasattr(measurement, "digest"):
                measurement.digest(model)
            else:
                callback._fingerprint(model)
                measurement._finite_weights(model)
            reads.append(time.perf_counter() - start)
    print(json.dumps({"variant": args.variant, "fit_s": fit_s, "reads": reads,
                      "params": model.count_params(), "epochs": epochs,
                      "gaptrack": gaptrack.__file__, "phases": phases.stop(),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(variant, args, tmp):
    """One variant in a fresh process; its figures."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [args.gaptrack or str(HERE.parent),
                                                        str(HERE)])))
    command = [sys.executable, str(Path(__file__)), "--worker", variant, "--tmp", tmp,
               "--size", str(args.size), "--images", str(args.images),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--reads", str(args.reads)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--images", type=int, default=64, help="training images (the probe)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reads", type=int, default=10,
                        help="times the weights are read again after the fit, to time it alone")
    parser.add_argument("--gaptrack", help="checkout whose gaptrack the workers import")
    parser.add_argument("--variants", nargs="+", choices=("plain", "tracked"),
                        default=["plain", "tracked"], help="the workers to run")
    parser.add_argument("--worker", choices=("plain", "tracked"), help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)

    with tempfile.TemporaryDirectory(prefix="gaptrack-scale-") as tmp:
        results = {v: run(v, args, tmp) for v in args.variants}
    if "plain" not in results:  # figures of the tracked worker alone
        print(json.dumps(results["tracked"]["phases"]))
        return
    tracked = results["tracked"]
    print(f"ConvNeXtBase, {tracked['params']:,} parameters; {args.images} images of "
          f"{args.size}x{args.size}, batch {args.batch_size}, {args.epochs} epochs; "
          f"gaptrack from {tracked['gaptrack']}")
    print(f"{'epoch':>5} {'on_epoch_end ms':>16} {'passes ms':>10} {'outside ms':>11} "
          f"{'weights ms':>11} {'background CPU ms':>18}")
    for e in tracked["epochs"]:
        outside = e["total"] - e["passes"]
        print(f"{e['epoch']:>5} {1000 * e['total']:>16.1f} {1000 * e['passes']:>10.1f} "
              f"{1000 * outside:>11.1f} {1000 * e['weights']:>11.1f} "
              f"{1000 * e['background_cpu']:>18.1f}")
    later = [e["total"] - e["passes"] for e in tracked["epochs"][1:]]
    if later:
        print(f"outside the passes, epochs after the first: max {1000 * max(later):.1f} ms "
              f"(target <= {TARGET_MS:.0f} ms); the first includes tracing the weights' "
              "reduction")
    reads = sorted(tracked["reads"])
    print(f"reading the weights (a sample: fingerprint + finiteness) alone, {len(reads)} times after the "
          f"fit: median {1000 * reads[len(reads) // 2]:.1f} ms, fastest {1000 * reads[0]:.1f} ms")
    plain = results["plain"]
    print(f"fit: plain {plain['fit_s']:.1f} s, tracked {tracked['fit_s']:.1f} s")
    print("resident set by phase, MB (at first entry / peak in it):")
    for name, figures in results.items():
        print(f"  {name}: " + "; ".join(f"{p} {a:,.0f} / {b:,.0f}"
                                       for p, (a, b) in figures["phases"].items()))
    print(f"peak RSS: plain {plain['peak_rss_mb']:,.0f} MB, tracked "
          f"{tracked['peak_rss_mb']:,.0f} MB (+{tracked['peak_rss_mb'] - plain['peak_rss_mb']:,.0f}"
          " MB)")


if __name__ == "__main__":
    main()
