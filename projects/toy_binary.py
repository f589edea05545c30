"""toy_binary: a ``train_on_batch`` loop on two clusters; accuracy before and after each
step, and as the question computed it.

Reproduces the custom-loop question this project was built from, which printed
lines like ``17> Before train: 0.53125, After train: 0.62500, Accuracy: 100.00000%``
and asked why the accuracies disagree. Two clusters of 80 points at (10, 10) and
(20, 20), label 0 and 1; each iteration trains on 32 random points (drawn with
replacement) with ``train_on_batch``. Two things make numbers disagree here, and
the run logs both, side by side:

1. **Drift** (the general cause). The accuracy ``train_on_batch`` returns is that
   of the model *before* the step's update (the step computes its predictions,
   then updates the weights), on those 32 points only; ``evaluate`` sees the
   model after the update, on all 160. Nothing behaves differently in training
   (no Dropout, no BN), so gaptrack's whole gap is drift, and once the clusters
   are separated (the model right on every point before and after its step) it
   is 0.
2. **Not the same quantity** (what produced the question's numbers). The
   question computed its before/after accuracies itself, as
   ``BinaryAccuracy().update_state(np.expand_dims(y_batch, axis=0),
   model.predict(X_batch))``: labels of shape (1, 32) against predictions of
   shape (32, 1), which broadcast to a 32 × 32 comparison, every prediction
   against every label of the batch. With ``k`` predictions above 0.5 and ``m``
   ones among the 32 labels, ``k·m + (32 - k)(32 - m)`` of the 1024 pairs agree;
   for a model right on every point (``k = m``, ``p = m/32``) that is
   ``p² + (1 - p)²``: 20 ones give (400 + 144)/1024 = 0.53125, 24 ones
   (576 + 64)/1024 = 0.625, the question's numbers, while the model's accuracy
   was 100%. With ``-P seed=4`` the run has both: iteration 144 (20 ones) and
   iteration 137 (24 ones), the model right on its batch. gaptrack refuses such
   labels (:mod:`gaptrack.probe`, :mod:`gaptrack.labels`); here the scenario
   computes them on purpose.

Logged per iteration (step = iteration) through GapTracker's custom-loop API,
``tracker.track(model)`` and ``tracker.log_epoch(step, logs)``, with ``logs``:

- ``loss`` and ``binary_accuracy`` as ``train_on_batch`` returned them;
- ``binary_accuracy_before``/``binary_accuracy_after`` (with ``loss_before``
  and ``loss_after``): ``test_on_batch`` on the same batch just before and just
  after the update, the model's true accuracy on it. ``binary_accuracy_before``
  equals ``binary_accuracy``: that is drift's point;
- ``broadcast_accuracy_before``/``broadcast_accuracy_after``: the question's
  metric call on the same batch, just before and just after the update, with
  ``model.predict_on_batch(x)`` for ``model.predict(x)`` (the same values:
  ``predict`` runs the 32 points as one batch at its default batch size; it
  costs ~140 ms a call in Keras 3.15 against 0.5 ms).

All become ``fit/<key>``; gaps are computed for the compiled keys (``loss``,
``binary_accuracy``), so the broadcast accuracy is logged beside the
decomposition, not in it. The printed lines say which is which.

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


#: The question's own accuracy, (1, n) labels against (n, 1) predictions; logged
#: as ``<key>_before`` and ``<key>_after``.
BROADCAST_ACCURACY = "broadcast_accuracy"


def broadcast_accuracy(model, x, y):
    """The accuracy as the question computed it: ``BinaryAccuracy().update_state(
    np.expand_dims(y, axis=0), model.predict(x))``, labels (1, n) against
    predictions (n, 1), an n × n comparison (``predict_on_batch``: the same values)."""
    import keras

    metric = keras.metrics.BinaryAccuracy()
    metric.update_state(np.expand_dims(y, axis=0), model.predict_on_batch(x))
    return float(metric.result())


def fit(model, data, config, track):
    rng = np.random.default_rng(config["seed"])
    tracker = track((data.x, data.y))
    iterations = config["iterations"]
    perfect = {}  # ones in the batch -> broadcast accuracy, where the model is right on it
    with tracker.track(model):
        for step in range(iterations):
            index = rng.integers(0, len(data.x), config["batch_size"])
            x, y = data.x[index], data.y[index]
            before = model.test_on_batch(x, y, return_dict=True)
            broadcast_before = broadcast_accuracy(model, x, y)
            logs = model.train_on_batch(x, y, return_dict=True)
            after = model.test_on_batch(x, y, return_dict=True)
            logs.update({f"{k}_before": v for k, v in before.items()})
            logs.update({f"{k}_after": v for k, v in after.items()})
            logs[f"{BROADCAST_ACCURACY}_before"] = broadcast_before
            logs[f"{BROADCAST_ACCURACY}_after"] = broadcast_accuracy(model, x, y)
            logged = tracker.log_epoch(step, logs)
            p = float(np.mean(y))
            if before["binary_accuracy"] == after["binary_accuracy"] == 1.0:
                perfect.setdefault(int(y.sum()), []).append(broadcast_before)
            if step % max(1, iterations // 10) == 0 or step == iterations - 1:
                print(f"iteration {step}: train_on_batch accuracy "
                      f"{logs['binary_accuracy']:.3f} (before the update, 32 points), "
                      f"after {logs['binary_accuracy_after']:.3f}, evaluate on all "
                      f"{len(data.x)}: {logged.eval_train['binary_accuracy']:.3f}, drift "
                      f"{logged.parts['binary_accuracy'].drift:+.3f}; the question's "
                      f"(1, {len(y)}) × ({len(y)}, 1) accuracy: before "
                      f"{logs[f'{BROADCAST_ACCURACY}_before']:.5f}, after "
                      f"{logs[f'{BROADCAST_ACCURACY}_after']:.5f} ({int(y.sum())} ones: "
                      f"p² + (1 - p)² = {p * p + (1 - p) ** 2:.5f})", flush=True)
    print(f"Which is which: binary_accuracy (train_on_batch, before the update) and "
          f"binary_accuracy_before/_after (test_on_batch) are the model's accuracy on its "
          f"batch; {BROADCAST_ACCURACY}_before/_after are the question's metric call, labels "
          f"(1, 32) against predictions (32, 1), compared in 32 × 32 pairs: for a model right "
          f"on every point p² + (1 - p)², p the batch's share of ones (0.53125 for 20 ones of "
          f"32, 0.625 for 24). Iterations right on their whole batch before and after the "
          f"update: {sum(map(len, perfect.values()))} of {iterations}"
          + ("; their broadcast accuracy, by ones in the batch: " + ", ".join(
              f"{ones}: {'/'.join(sorted({f'{v:.5f}' for v in values}))}"
              for ones, values in sorted(perfect.items())) if perfect else "") + ".", flush=True)
