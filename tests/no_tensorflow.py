"""gaptrack's whole path on the Keras backend ``KERAS_BACKEND`` names, in a
process of its own: trains, measures, recalibrates and autologs a small BN +
Dropout model, and writes what it logged and whether TensorFlow was imported.

No ``keras.utils.set_random_seed``: it imports TensorFlow when it is installed.
Run by ``tests/test_backends.py`` (started in the background, see conftest.py).

Usage: KERAS_BACKEND=jax python no_tensorflow.py TRACKING_URI OUT.json
"""

import json
import os
import sys

import mlflow
import numpy as np

import gaptrack
import keras
from mlflow.tracking import MlflowClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from builders import blobs  # noqa: E402

mlflow.set_tracking_uri(sys.argv[1])
x, y = blobs(96)
model = keras.Sequential([
    keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
    keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, seed=1),
    keras.layers.Dense(3, activation="softmax"),
])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
probe = (x, y)
tracker = gaptrack.GapTracker(probe, batch_size=16)
model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker])
evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
moving_mean = model.get_layer("bn").moving_mean.numpy().astype(np.float64).tolist()
measured = gaptrack.measure(model, probe, batch_size=16)
table = gaptrack.recalibrate_bn(model, probe, batch_size=16)
recalibrated = model.evaluate(x, y, verbose=0, return_dict=True)
snapshots = gaptrack.load_bn_snapshots(tracker.run_id)
last = snapshots[snapshots.epoch == snapshots.epoch.max()].sort_values("channel")
logged = {p.step: p.value
          for p in MlflowClient().get_metric_history(tracker.run_id, "eval_train/loss")}
gaptrack.autolog()
with mlflow.start_run() as run:
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
autologged = MlflowClient().get_run(run.info.run_id).data.metrics
after = model.evaluate(x, y, verbose=0, return_dict=True)
result = json.dumps({
    "tensorflow_imported": "tensorflow" in sys.modules,
    "backend": keras.backend.backend(),
    "logged_eval_train_loss": logged[max(logged)],
    "logged_epochs": sorted(logged),
    "evaluate": evaluated,
    "measured_eval_train": measured.eval_train,
    "measured_precise_bn": measured.precise_bn,
    "recalibrated": recalibrated,
    "recalibrated_layers": table.recalibrated.tolist(),
    "snapshot_epoch": int(last.epoch.max()),
    "snapshot_layers": sorted(last.layer.unique()),
    "snapshot_moving_mean": last.moving_mean.tolist(),
    "moving_mean": moving_mean,
    "autologged_eval_train_loss": autologged.get("eval_train/loss"),
    "evaluate_after_autologged_fit": after,
})
with open(sys.argv[2], "w") as out:
    out.write(result)
