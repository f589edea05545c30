"""transfer: a pretrained conv base with BN, a Dropout head, an oversampled stream.

Reproduces the transfer-learning case: a pretrained convolutional base that
contains BatchNormalization, a new head (global average pooling, Dense,
Dropout(0.5), sigmoid) learning a binary task (one class against the rest), and
training that reads an oversampled, repeated ``tf.data`` pipeline with
``steps_per_epoch``. ``fit()`` reported a loss of 0.2, ``evaluate()`` on batches
of the same stream 1.7: evaluate much *worse* than fit, which Dropout cannot do
(it makes fit's number the worse one). Two forms, chosen by ``freeze``:

- ``freeze=0`` (the default: the case's symptom): the base is fine-tuned with
  the head, so its BN layers train. In ``fit()`` they normalise each batch with
  the batch's own statistics; ``evaluate()`` uses their moving averages
  (momentum 0.99), which after the 60 steps the stream allows (3 epochs of 20)
  still hold 0.99^60 = 55% of the pretraining data's statistics, while the
  base's weights, and so what its BN layers see, have moved. With seed 0,
  ``fit/loss`` 0.015 against ``eval_train/loss`` 1.16: ``bn_ema``. How much
  worse is chaotic in the seed and the CPU's float arithmetic: on a CPU where
  TensorFlow runs without oneDNN (no AVX-512) seed 0 gives 0.009 against 0.064,
  seeds 1 to 5 0.34 to 10.7; always ``bn_ema``, and recalibrating closes it.
  ``gaptrack.recalibrate_bn(model, probe)`` sets the moving statistics to the
  probe's and ``evaluate()`` agrees with ``fit()`` again (0.014).
- ``freeze=1``: ``base.trainable = False``. Keras 3 runs a frozen BN layer in
  inference mode, in ``fit()`` and ``evaluate()`` alike, with the pretraining
  data's statistics: BN layers exist but none trains (no ``precise_bn``
  measurement, ``bn_ema`` is 0), so the old symptom cannot appear. What is left
  is the head's Dropout (``mode``) and the head learning during the epoch
  (``drift``), both making ``evaluate()`` *better* than ``fit()``. With seed 0,
  ``fit/loss`` 0.20 against ``eval_train/loss`` 0.12. The BN staleness metrics
  show how far the frozen statistics are from the new data.

The gap is measured on a fixed probe, since a repeating pipeline has no end to
measure on. Two ways, chosen by ``pipeline``:

- ``pipeline=take`` (the default): the first ``probe_batches`` batches of the
  training pipeline, given to the tracker by hand
  (``GapTracker(dataset.take(probe_batches))``, read once).
- ``pipeline=oversampled``: the case as its user wrote it (seed 002),
  ``gaptrack.autolog()`` on and ``fit(dataset, steps_per_epoch=...,
  validation_data=..., callbacks=[EarlyStopping(restore_best_weights=True),
  ModelCheckpoint(...)])``: autolog draws the probe once from a copy of the
  pipeline (its first ``steps_per_epoch`` batches, at most ``probe_size``
  samples; ``probe_batches`` is not used) and says so in a warning and in the
  report; ``returned/*`` is the model ``fit()`` returns when EarlyStopping
  (patience 3, on ``val_loss``) restored an earlier epoch. The validation data
  are the data set's test split, the positive class against the rest, not
  oversampled; the best checkpoint is logged as ``checkpoint/best.keras``.
  ``-P epochs=15`` trains as long as the case did.

Offline, the base is pretrained in the run: the data set's training samples are
split in two, the even-indexed ones, without the positive class, pretrain a
small conv net (Conv-BN-ReLU x 2 with a softmax head) for ``pretrain_epochs``;
the odd-indexed ones are the transfer task. A base pretrained to convergence
(ImageNet's) holds its data's population statistics in BN, so those are then set
(``gaptrack.recalibrate_bn`` on the pretraining split). Without that step the
head learned nothing (loss ln 2 = 0.69): 2 epochs of 21 steps had moved the
moving variances only 1 - 0.99^42 = 34% of the way from 1 to the ~0.01 of the
layers' inputs, so the frozen base, in inference mode, shrank its first layer's
output ~7-fold and the head saw nearly constant features (a spread of 0.008
between samples instead of 0.18). The learning rate is 0.01: with the
statistics set, 100 steps of Adam at 0.001 still left the frozen form's loss at
0.56, at 0.01 at 0.12. The stream is 3 epochs of 20 steps: after 100 the
fine-tuned form's moving averages had caught up on 2 seeds of 4 (evaluate 0.02
against fit 0.01), after 60 none had (evaluate 1.2 to 8.9 against at most
0.016). The base's weights are logged as the artifact
``base/base.weights.h5``, which ``base_weights=<path>`` loads instead of
pretraining. ``imagenet`` weights fit ``keras.applications`` networks on
3-channel images and come from the internet, so this base cannot have them: a
clear error. Images without a channel axis (digits are 8x8) get one.
"""

import os
from dataclasses import dataclass

import numpy as np

from projects.params import Param, ParamError, choice, common, flag, integer
from projects.training import Data, load, log_input

PRETRAIN = "pretrain"
#: How the probe is given: by hand (``take``) or drawn by autolog (``oversampled``).
PIPELINES = ("take", "oversampled")
#: EarlyStopping's patience in the oversampled form.
PATIENCE = 3


def _base_weights(name, value):
    if value == PRETRAIN:
        return value
    if value == "imagenet":
        raise ParamError(f"{name} 'imagenet' is not available: ImageNet weights fit a "
                         "keras.applications network on 3-channel images and are downloaded "
                         "from the internet; this base is a small conv net: use 'pretrain' or "
                         "the path of a .weights.h5 file logged by an earlier run")
    if not str(value).endswith(".weights.h5") or not os.path.isfile(value):
        raise ParamError(f"{name} must be 'pretrain' or the path of an existing .weights.h5 "
                         f"file, got {value!r}")
    return os.path.abspath(value)


PARAMS = {
    **common(dataset="digits", samples="all", epochs=3, batch_size=32, learning_rate=1e-2),
    "positive_class": integer(0, minimum=0),
    "pretrain_epochs": integer(5, minimum=1),
    "steps_per_epoch": integer(20, minimum=1),
    "probe_batches": integer(16, minimum=1),
    "freeze": flag(0),
    "base_weights": Param(PRETRAIN, _base_weights,
                          "pretrain, or the path of a .weights.h5 file"),
    "pipeline": Param("take", choice("take", PIPELINES).convert,
                      "take (GapTracker given the first probe_batches batches) or "
                      "oversampled (seed 002: autolog draws the probe; validation data, "
                      "EarlyStopping, ModelCheckpoint)"),
}


@dataclass
class TransferData(Data):
    """The transfer task's data (``y`` is 1 for the positive class, else 0),
    and the other split the base is pretrained on."""

    pretrain: tuple = None


def data(config):
    full = load(config)
    x = _with_channel(full.x)
    positive = config["positive_class"]
    if positive >= full.num_classes:
        raise ParamError(f"positive_class must be < {full.num_classes} (the classes of "
                         f"{full.name}), got {positive}")
    x_pre, y_pre = x[0::2], full.y[0::2]
    keep = y_pre != positive
    x_task, y_task = x[1::2], (full.y[1::2] == positive).astype("float32")
    for label, what in ((1.0, f"class {positive}"), (0.0, "other classes")):
        if not np.any(y_task == label):
            raise ParamError(f"the transfer split of {len(x_task)} samples has no sample of "
                             f"{what}; raise samples")
    validation = None
    if config["pipeline"] == "oversampled":
        from projects.datasets import load_dataset

        test = load_dataset(config["dataset"], seed=config["seed"])
        validation = (_with_channel(test.x_test), (test.y_test == positive).astype("float32"))
    return TransferData(full.name, full.source, x_task, y_task, validation, full.num_classes,
                        full.size, pretrain=(x_pre[keep], y_pre[keep]))


def _with_channel(x):
    """Images with a channel axis (digits are 8x8)."""
    return x if x.ndim == 4 else x[..., np.newaxis]


def model(config, data):
    import keras

    base = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        keras.layers.Conv2D(16, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
    ], name="base")
    if config["base_weights"] == PRETRAIN:
        _pretrain(base, data, config)
    else:
        base.load_weights(config["base_weights"])
    base.trainable = not config["freeze"]
    model = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        base,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]), "binary_crossentropy",
                  metrics=["accuracy"])
    return model


def _pretrain(base, data, config):
    """Train ``base`` with a softmax head on the pretraining split, set its BN
    statistics to the split's population statistics; log its weights."""
    import tempfile

    import gaptrack
    import keras
    import mlflow

    x, y = data.pretrain
    log_input(x, y, f"{data.name} (pretraining split)", data.source, context="pretraining")
    classifier = keras.Sequential([
        base,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ])
    classifier.compile(keras.optimizers.Adam(config["learning_rate"]),
                       "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = classifier.fit(x, y, batch_size=config["batch_size"],
                             epochs=config["pretrain_epochs"], verbose=0)
    gaptrack.recalibrate_bn(classifier, (x, y), batch_size=config["batch_size"])
    print(f"pretrained the base on {len(x)} samples: accuracy "
          f"{history.history['accuracy'][-1]:.3f}; its BN statistics set to the "
          "pretraining data's", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "base.weights.h5")
        base.save_weights(path)
        mlflow.log_artifact(path, "base")


def stream(data, config):
    """The training pipeline: positives and negatives drawn half and half
    (oversampling), each shuffled and repeated, in batches; seeded."""
    import tensorflow as tf

    seed = config["seed"]

    def one_label(label):
        mask = data.y == label
        pairs = tf.data.Dataset.from_tensor_slices((data.x[mask], data.y[mask]))
        return pairs.shuffle(int(mask.sum()), seed=seed).repeat()

    return tf.data.Dataset.sample_from_datasets(
        [one_label(1.0), one_label(0.0)], weights=[0.5, 0.5], seed=seed,
    ).batch(config["batch_size"])


def fit(model, data, config, track):
    dataset = stream(data, config)
    if config["pipeline"] == "take":
        model.fit(dataset, epochs=config["epochs"], steps_per_epoch=config["steps_per_epoch"],
                  callbacks=[track(dataset.take(config["probe_batches"]))], verbose=2)
        return
    import tempfile

    import gaptrack
    import keras
    import mlflow
    import tensorflow as tf

    validation = tf.data.Dataset.from_tensor_slices(data.validation).batch(config["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "best.keras")
        callbacks = [keras.callbacks.EarlyStopping(patience=PATIENCE, restore_best_weights=True),
                     keras.callbacks.ModelCheckpoint(path, save_best_only=True)]
        gaptrack.autolog(probe_size=config["probe_size"], seed=config["seed"])
        try:
            model.fit(dataset, epochs=config["epochs"],
                      steps_per_epoch=config["steps_per_epoch"], validation_data=validation,
                      callbacks=callbacks, verbose=2)
        finally:
            gaptrack.autolog(disable=True)
        mlflow.log_artifact(path, "checkpoint")
