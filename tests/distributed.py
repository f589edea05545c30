"""Tracked training under a ``tf.distribute`` strategy, in its own process.

Logical CPU devices and the cluster must be set up before TensorFlow
initialises, hence a process per strategy (as Keras' own
``integration_tests/tf_distribute_training_test.py`` does). Each mode runs its
checks and writes the numbers as JSON for ``test_distribute.py`` to assert on.

Usage:
    python distributed.py mirrored OUT.json
        2 logical CPUs, MirroredStrategy; tracking URI from MLFLOW_TRACKING_URI.
    python distributed.py multiworker OUT.json
        one worker of a MultiWorkerMirroredStrategy job (TF_CONFIG set by the
        caller); OUT.json gets this worker's numbers.
    python distributed.py jax_data_parallel OUT.json
        KERAS_BACKEND=jax with 2 host CPU devices (XLA_FLAGS set by the caller),
        keras.distribution.DataParallel over them.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 50
EPOCHS = 3


def _model(bn, synchronized=False):
    import keras

    layers = [keras.Input((6,)), keras.layers.Dense(16, activation="elu")]
    if bn:
        layers.append(keras.layers.BatchNormalization(synchronized=synchronized))
    layers.append(keras.layers.Dense(3, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=False)
    return model


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _replica_spread(strategy, model):
    """The spread of the BN copies, each read inside its own replica."""
    from gaptrack.distribute import spread

    bn = model.layers[1]
    copies = strategy.run(lambda: (tf.identity(bn.moving_mean.value),
                                   tf.identity(bn.moving_variance.value)))
    means = [v.numpy() for v in strategy.experimental_local_results(copies[0])]
    variances = [v.numpy() for v in strategy.experimental_local_results(copies[1])]
    return spread(means, variances, bn.epsilon)


def mirrored(out):
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import mlflow

    import gaptrack
    from builders import blobs
    from gaptrack.runs import load_history
    from gaptrack.report import build_report

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = blobs(400, seed=0)
    result = {}

    # BN that is not synchronized: the example (Dense+BN, global batch 50)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _model(bn=True)
    tracker = gaptrack.GapTracker((x, y), batch_size=GLOBAL_BATCH)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=3, verbose=0, callbacks=[tracker])
    last = tracker.records[-1]
    saved = os.path.join(os.path.dirname(out), "saved.keras")
    model.save(saved)
    reloaded = keras.models.load_model(saved)
    result["bn"] = {
        "run_id": tracker.run_id,
        "spreads": [r.bn_spread for r in tracker.records],
        "independent_spread": _replica_spread(strategy, model),
        "eval_train": last.eval_train,
        "saved_evaluate": reloaded.evaluate(x, y, verbose=0, return_dict=True),
        "strategy_evaluate": model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0,
                                            return_dict=True),
    }
    # train_mode/precise_bn: as one device at the per-replica batch
    copy = _model(bn=True)
    copy.set_weights(model.get_weights())
    start = time.perf_counter()
    measured = gaptrack.measure(model, (x, y), batch_size=GLOBAL_BATCH)
    result["bn"]["measure_seconds"] = time.perf_counter() - start
    per_replica = gaptrack.measure(copy, (x, y), batch_size=GLOBAL_BATCH // 2)
    result["bn"]["train_mode"] = [measured.train_mode, per_replica.train_mode]
    result["bn"]["precise_bn"] = [measured.precise_bn, per_replica.precise_bn]
    history = load_history(tracker.run_id)
    result["bn"]["tags"] = history.tags
    result["bn"]["logged_spreads"] = [r.bn_spread for r in history.records]
    result["bn"]["context"] = build_report(history).context
    # recalibrate_bn sets every replica's copy
    gaptrack.recalibrate_bn(model, (x, y), batch_size=GLOBAL_BATCH)
    result["recalibrated"] = {
        "spread": _replica_spread(strategy, model),
        "precise_bn": measured.precise_bn,
        "strategy_evaluate": model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True),
    }

    # synchronized BN, tracked by autolog
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = _model(bn=True, synchronized=True)
    gaptrack.autolog()
    try:
        with mlflow.start_run() as run:
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    finally:
        gaptrack.autolog(disable=True)
    sync = load_history(run.info.run_id)
    copy = _model(bn=True, synchronized=True)
    copy.set_weights(model.get_weights())
    result["sync"] = {
        "spreads": [r.bn_spread for r in sync.records],
        "tags": sync.tags,
        "eval_train": sync.records[-1].eval_train,
        "strategy_evaluate": model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True),
        "train_mode": [gaptrack.measure(model, (x, y), batch_size=GLOBAL_BATCH).train_mode,
                       gaptrack.measure(copy, (x, y), batch_size=GLOBAL_BATCH).train_mode],
    }

    # no BN
    keras.utils.set_random_seed(2)
    with strategy.scope():
        model = _model(bn=False)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    result["plain"] = {
        "eval_train": gaptrack.measure(model, (x, y), batch_size=GLOBAL_BATCH).eval_train,
        "strategy_evaluate": model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True),
    }
    with open(out, "w") as f:
        json.dump(result, f)


def _count_requests():
    """Every HTTP request this process sends: ``(method, path, metric steps)``."""
    import requests

    sent = []
    real = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        body = kwargs.get("json") or {}
        steps = sorted({int(m.get("step", 0)) for m in body.get("metrics", [])})
        sent.append((method, url.split("/api/", 1)[-1], steps))
        return real(self, method, url, *args, **kwargs)

    requests.Session.request = request
    return sent


def multiworker(out):
    """One worker: ``fit()`` without gaptrack (keras-team/keras#20585), then a
    custom loop under the strategy tracked by ``GapTracker.track``."""
    import keras

    import gaptrack
    from builders import blobs
    from gaptrack.distribute import is_chief

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    sent = _count_requests()
    x, y = blobs(400, seed=0)
    result = {"chief": is_chief(strategy), "replicas": strategy.num_replicas_in_sync}

    with strategy.scope():
        model = _model(bn=False)
    try:
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
        result["fit_error"] = None
    except Exception as error:  # the upstream failure, reported to the test
        result["fit_error"] = f"{type(error).__name__}: {str(error)[-200:]}"

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = _model(bn=True, synchronized=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH))

    @tf.function
    def train_step(xb, yb):
        def step(xb, yb):
            with tf.GradientTape() as tape:
                per_sample = loss_fn(yb, model(xb, training=True))
                loss = tf.nn.compute_average_loss(per_sample, global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.reduce("SUM", strategy.run(step, args=(xb, yb)), axis=None)

    @tf.function
    def loss_sum(xb, yb):
        def step(xb, yb):
            return tf.reduce_sum(loss_fn(yb, model(xb, training=False)))
        return strategy.reduce("SUM", strategy.run(step, args=(xb, yb)), axis=None)

    # the run `mlflow run` created for the chief (README, "Distributed training")
    tracker = gaptrack.GapTracker((x, y), batch_size=GLOBAL_BATCH,
                                  run_id=os.environ.get("MLFLOW_RUN_ID"))
    epoch_seconds = []
    with tracker.track(model):
        for epoch in range(EPOCHS):
            losses = [float(train_step(xb, yb)) for xb, yb in dataset]
            start = time.perf_counter()
            tracker.log_epoch(epoch, {"loss": float(np.mean(losses))})
            epoch_seconds.append(time.perf_counter() - start)
    result.update(
        run_id=tracker.run_id, records=len(tracker.records),
        measured=[r.measured for r in tracker.records],
        eval_train=tracker.records[-1].eval_train,
        # evaluation under the strategy, every worker its shard, all-reduced
        strategy_loss=float(sum(loss_sum(xb, yb) for xb, yb in dataset)) / len(x),
        requests=sent, tracker_seconds=epoch_seconds,
        spool=sorted(os.listdir(os.environ["GAPTRACK_SPOOL_DIR"]))
        if os.path.isdir(os.environ["GAPTRACK_SPOOL_DIR"]) else [],
    )
    with open(out, "w") as f:
        json.dump(result, f)


def jax_data_parallel(out):
    """``DataParallel`` over the 2 CPU devices: the step is one XLA program over
    the global batch, so BN normalises with the global batch's moments."""
    import jax
    import keras

    import gaptrack
    from builders import blobs
    from gaptrack.runs import load_history

    devices = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    x, y = blobs(400, seed=0)
    result = {"devices": len(jax.devices()), "backend": keras.backend.backend()}

    # the weights do not move (learning rate 0): fit's loss is the training-mode loss
    keras.utils.set_random_seed(0)
    model = _model(bn=True)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    tracker = gaptrack.GapTracker((x, y), batch_size=GLOBAL_BATCH)
    fit = model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
                    callbacks=[tracker])
    history = load_history(tracker.run_id)
    result["frozen"] = {
        "fit": {k: v[-1] for k, v in fit.history.items()},
        "train_mode": tracker.records[-1].train_mode,
        # what each device's half of a batch alone would give (shuffle=False: the
        # halves are the consecutive batches of 25)
        "per_device": gaptrack.measure(model, (x, y), batch_size=GLOBAL_BATCH // 2).train_mode,
        "tags": history.tags,
        "spread": tracker.records[-1].bn_spread,
    }

    # training: eval_train is evaluate() under the distribution
    keras.utils.set_random_seed(1)
    model = _model(bn=True)
    tracker = gaptrack.GapTracker((x, y), batch_size=GLOBAL_BATCH)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, verbose=0, callbacks=[tracker])
    result["trained"] = {
        "eval_train": tracker.records[-1].eval_train,
        "evaluate": model.evaluate(x, y, verbose=0, return_dict=True),
        "moving_mean_sharding": str(model.layers[1].moving_mean.value.sharding),
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    {"mirrored": mirrored, "multiworker": multiworker,
     "jax_data_parallel": jax_data_parallel}[sys.argv[1]](sys.argv[2])
