"""toy_binary: a ``train_on_batch`` loop on two clusters; accuracy before and after each step.

Reproduces the custom-loop form of the question: the accuracy ``train_on_batch``
returns disagrees with what ``evaluate`` says on the same data. Two clusters of 80 points at
(10, 10) and (20, 20), label 0 and 1; each iteration trains on 32 random points
(drawn with replacement) with ``train_on_batch``. The accuracy it returns is that
of the model *before* the step's update (the step computes its predictions, then
updates the weights), on those 32 points only; ``evaluate`` sees the model after
the update, on all 160. Nothing behaves differently in training (no Dropout, no
BN), so the whole gap is drift.

Logged per iteration (step = iteration) through GapTracker's custom-loop API,
``tracker.track(model)`` and ``tracker.log_epoch(step, logs)``, with ``logs``:
``loss`` and ``binary_accuracy`` as ``train_on_batch`` returned them, and
``binary_accuracy_before``/``binary_accuracy_after`` from ``test_on_batch`` on
the same batch just before and just after the update (with ``loss_before`` and
``loss_after``). ``binary_accuracy_before`` equals ``binary_accuracy``: that is
the point. All become ``fit/<key>``; gaps are computed for the compiled keys.

Keras 3.15 and the metric accumulators: ``train_on_batch`` and ``test_on_batch``
share the compiled metric variables, and both reset them before their batch, so
each returns its own batch's values: a ``test_on_batch`` in between does not
change what the next ``train_on_batch`` reports, but it does overwrite what
``model.metrics`` hold afterwards. (Keras 2's ``reset_metrics=False``, which
accumulated over calls, is gone.) ``model.evaluate`` resets them too.
GapTracker's measurements are stateless and touch none of them.

Model, as in the field: Dense(12, relu) -> LeakyReLU(0.01) -> Dense(1, sigmoid)
(the LeakyReLU after a ReLU changes nothing, kept as found), Adam(0.005),
binary cross-entropy, BinaryAccuracy.
"""

import numpy as np

from projects.params import common, integer
from projects.training import Data

PARAMS = {
    **common(batch_size=32, learning_rate=0.005),
    "iterations": integer(200, minimum=1),
}

CENTERS = ((10.0, 10.0), (20.0, 20.0))
POINTS_PER_CLUSTER = 80
#: Standard deviation of each cluster's points around its center.
SPREAD = 1.0


def data(config):
    rng = np.random.default_rng(config["seed"])
    x = np.concatenate([rng.normal(c, SPREAD, (POINTS_PER_CLUSTER, 2)) for c in CENTERS])
    y = np.repeat(np.arange(len(CENTERS)), POINTS_PER_CLUSTER)
    source = (f"generated: {len(CENTERS)} Gaussian clusters of {POINTS_PER_CLUSTER} points "
              f"at {CENTERS[0]} and {CENTERS[1]}, standard deviation {SPREAD:g}")
    return Data("toy_clusters", source, x.astype("float32"), y.astype("float32"), None,
                len(CENTERS), len(x))


def model(config, data):
    import keras

    model = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(12, activation="relu"),
        keras.layers.LeakyReLU(negative_slope=0.01),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]), "binary_crossentropy",
                  metrics=[keras.metrics.BinaryAccuracy()])
    return model


def fit(model, data, config, track):
    rng = np.random.default_rng(config["seed"])
    tracker = track((data.x, data.y))
    iterations = config["iterations"]
    with tracker.track(model):
        for step in range(iterations):
            index = rng.integers(0, len(data.x), config["batch_size"])
            x, y = data.x[index], data.y[index]
            before = model.test_on_batch(x, y, return_dict=True)
            logs = model.train_on_batch(x, y, return_dict=True)
            after = model.test_on_batch(x, y, return_dict=True)
            logs.update({f"{k}_before": v for k, v in before.items()})
            logs.update({f"{k}_after": v for k, v in after.items()})
            logged = tracker.log_epoch(step, logs)
            if step % max(1, iterations // 10) == 0 or step == iterations - 1:
                print(f"iteration {step}: train_on_batch accuracy "
                      f"{logs['binary_accuracy']:.3f} (before the update, 32 points), "
                      f"after {logs['binary_accuracy_after']:.3f}, evaluate on all "
                      f"{len(data.x)}: {logged.eval_train['binary_accuracy']:.3f}", flush=True)
