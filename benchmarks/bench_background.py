"""What a background thread's CPU costs the training thread: wall time per CPU second.

``bench_tracker.py`` counts gaptrack's background threads (the epoch images, the
sender) either as wall time or not at all; this measures where between the two it
falls. One process trains the 20-layer BN MLP (batch 32) on Fashion-MNIST, its
epochs alternating between a thread that renders one epoch's two images
(``gaptrack.publish``) without pause and no such thread. The wall time the loaded
epochs lose, divided by the CPU time the thread used in them, is what each second
of background CPU costs training. The thread never pauses, so the load is far
heavier than gaptrack's (a fraction of a second an epoch): the figure is an upper
end.

Usage:
    python benchmarks/bench_background.py              # 12,000 images, 8 epochs each way
    python benchmarks/bench_background.py --pairs 4
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12_000)
    parser.add_argument("--pairs", type=int, default=8, help="epochs with and without the thread")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench-background-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
    os.environ["GAPTRACK_SPOOL_DIR"] = f"{scratch}/spool"
    sys.path.insert(0, str(REPO))
    import keras

    import _case
    import gaptrack
    from gaptrack import publish

    data = _case.data(args.samples)
    model = _case.model(data)
    tracker = gaptrack.GapTracker((data.x, data.y), batch_size=32, probe_size=3_000)
    model.fit(data.x, data.y, batch_size=32, epochs=1, verbose=0, callbacks=[tracker])
    record = tracker.records[-1]  # a real epoch's record, for real images

    loaded, stop, used = threading.Event(), threading.Event(), [0.0]

    def render():
        while not stop.is_set():
            if not loaded.is_set():
                time.sleep(0.01)
                continue
            start = time.thread_time()
            publish._epoch_images(record)
            used[0] += time.thread_time() - start

    epochs = {True: [], False: []}

    class Alternate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.load, self.start, used[0] = epoch % 2 == 1, None, 0.0
            if self.load:
                loaded.set()

        def on_train_batch_begin(self, batch, logs=None):
            if self.start is None:  # timed from the first batch, as bench_tracker.py
                self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start
            loaded.clear()
            time.sleep(0.5)  # the render in progress ends before the next epoch
            epochs[self.load].append((seconds, used[0]))

    thread = threading.Thread(target=render, daemon=True)
    thread.start()
    model.fit(data.x, data.y, batch_size=32, epochs=2 * args.pairs, verbose=0,
              callbacks=[Alternate()])
    stop.set()
    free = statistics.median(s for s, _ in epochs[False])
    busy = statistics.median(s for s, _ in epochs[True])
    cpu = statistics.median(c for _, c in epochs[True])
    print(f"epochs without the thread: {' '.join(f'{s:.2f}' for s, _ in epochs[False])} s")
    print(f"epochs with it:            {' '.join(f'{s:.2f}' for s, _ in epochs[True])} s "
          f"(its CPU: {' '.join(f'{c:.2f}' for _, c in epochs[True])} s)")
    print(f"median {busy:.2f} s with the thread against {free:.2f} s without, for {cpu:.2f} s "
          f"of its CPU: {(busy - free) / cpu:.2f} s of training wall time per CPU second")


if __name__ == "__main__":
    sys.exit(main())
