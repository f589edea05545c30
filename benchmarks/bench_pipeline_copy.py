"""What drawing autolog's probe from a copy of an infinite pipeline costs.

Seed 002's pipeline over Fashion-MNIST's 60,000 training images (188 MB of
float32 held by ``from_tensor_slices``): each class of a one-against-the-rest
task shuffled and repeated, mixed half and half by ``sample_from_datasets``,
batched by 32. The copy's serialised graph holds those arrays, so building it
copies them. Printed: the time to draw the probe (``Probe.from_pipeline``,
``steps_per_epoch`` batches) against one training epoch of a small CNN on the
same pipeline, and the memory the draw added at its peak against the data's
size.

    python benchmarks/bench_pipeline_copy.py [steps_per_epoch]
"""

import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(steps=100):
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks._case import data
    from gaptrack.probe import Probe

    train = data(60_000)
    x, y = train.x[..., np.newaxis], (train.y == 0).astype("float32")

    def pipeline():
        def one(label):
            keep = y == label
            pairs = tf.data.Dataset.from_tensor_slices((x[keep], y[keep]))
            return pairs.shuffle(10_000).repeat()

        return tf.data.Dataset.sample_from_datasets([one(1.0), one(0.0)], [0.5, 0.5]).batch(32)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(x.shape[1:]), keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dropout(0.3), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    dataset = pipeline()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)  # compiled, warmed
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    epoch = time.perf_counter() - start

    before = _peak_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = Probe.from_pipeline(dataset, steps=steps)
    draw = time.perf_counter() - start
    added = _peak_mb() - before
    size = (x.nbytes + y.nbytes) / 2**20
    print(f"data {size:.0f} MB; probe {probe.size} samples ({steps} batches of 32)")
    print(f"draw {draw:.2f} s, one epoch of fit {epoch:.2f} s: ratio {draw / epoch:.2f}")
    print(f"peak memory added by the draw {added:.0f} MB: {added / size:.2f} x the data")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
