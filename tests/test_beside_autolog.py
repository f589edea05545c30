"""gaptrack beside MLflow's own autolog (``mlflow.keras`` / ``mlflow.tensorflow``).

Enabled in either order, and on and off again, with every way of calling
``fit``: one run holding MLflow's keys and gaptrack's, with the same numbers as
``History`` (and, for the measured side, ``model.evaluate``).

MLflow's autolog runs with ``log_models=False``: logging the model takes ~15 s
a ``fit`` here and does not touch ``fit``'s arguments or callbacks. One model is
trained across the module (traced once), each ``fit`` going on from the last.
"""

import contextlib

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gaptrack
from builders import blobs, mlp

FLAVORS = ("keras", "tensorflow")
ORDERS = ("mlflow_first", "gaptrack_first")
X, Y = blobs(48)
CLASS_WEIGHT = {0: 1.0, 1: 3.0, 2: 0.5}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return mlp()


def mlflow_autolog(flavor, **kwargs):
    getattr(mlflow, flavor).autolog(**({"log_models": False} | kwargs))


@contextlib.contextmanager
def both_autologs(flavor, order):
    """MLflow's autolog and gaptrack's, enabled in ``order``; both off after."""
    original = keras.Model.fit
    steps = [lambda: mlflow_autolog(flavor), gaptrack.autolog]
    for enable in steps if order == "mlflow_first" else steps[::-1]:
        enable()
    try:
        yield
    finally:
        gaptrack.autolog(disable=True)
        mlflow_autolog(flavor, disable=True)
    assert keras.Model.fit is original and "fit" not in vars(keras.Model)


def run_ids():
    return {r.info.run_id for r in MlflowClient().search_runs(["0"])}


def fit_in_one_run(call):
    """Run ``call()``; the one run it created and its ``History``."""
    before = run_ids()
    history = call()
    new = run_ids() - before
    assert len(new) == 1, f"{len(new)} runs created"
    return MlflowClient().get_run(new.pop()), history


def history_of(run_id, key):
    return [(p.step, p.value) for p in MlflowClient().get_metric_history(run_id, key)]


def assert_both(run, history, flavor, mlflow_keys=True, mlflow_params=True):
    """gaptrack's keys in ``run``, equal to ``History``, and MLflow's, equal to both
    (its params too, unless ``mlflow_params`` is false)."""
    run_id, data = run.info.run_id, run.data
    for name, values in history.history.items():
        key = f"val/{name[4:]}" if name.startswith("val_") else f"fit/{name}"
        assert history_of(run_id, key) == list(enumerate(values)), key
        if mlflow_keys:
            assert history_of(run_id, name) == list(enumerate(values)), name
    assert data.tags["gaptrack.version"] == gaptrack.__version__
    assert data.metrics["gap/loss"] == pytest.approx(
        data.metrics["fit/loss"] - data.metrics["eval_train/loss"], abs=1e-6)
    if mlflow_keys and mlflow_params:
        assert data.params["epochs"] == "2"
    assert run.info.status == "FINISHED"


def weighted_loss(model):
    weights = np.array([CLASS_WEIGHT[int(c)] for c in Y], "float32")
    return model.evaluate(X, Y, sample_weight=weights, verbose=0, return_dict=True)["loss"]


# the ways of calling fit: (name, fit call given the model and the user's callbacks)
CALLS = {
    "positional": lambda m, cbs: m.fit(X, Y, 16, 2, 0, cbs),
    "keywords, tuple, validation_data, class_weight": lambda m, cbs: m.fit(
        x=X, y=Y, batch_size=16, epochs=2, verbose=0, callbacks=tuple(cbs),
        validation_data=(X[:16], Y[:16]), class_weight=CLASS_WEIGHT),
    "no callbacks": lambda m, cbs: m.fit(X, Y, epochs=2, verbose=0),
    "callbacks=None": lambda m, cbs: m.fit(X, Y, epochs=2, verbose=0, callbacks=None),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("flavor", FLAVORS)
def test_one_run_with_both_sets_of_keys_whatever_the_order_and_the_call(
        sqlite_uri, model, flavor, order):
    user_callbacks = [keras.callbacks.LambdaCallback()]
    kept = list(user_callbacks)
    with both_autologs(flavor, order):
        for name, call in CALLS.items():
            if flavor == "tensorflow" and name in ("no callbacks", "callbacks=None"):
                continue  # its patch reads callbacks as `list(... or [])`: as the tuple
            # MLflow's Keras patch alone fails on callbacks=None or a tuple, logs the
            # defaults of positional arguments and appends to the user's list: gaptrack's
            # wrapper, before it in either order (on Sequential, this model's class),
            # hands it fit's arguments by keyword and a list of its own
            run, history = fit_in_one_run(lambda: call(model, user_callbacks))
            assert_both(run, history, flavor)
            assert user_callbacks == kept and len(user_callbacks) == 1, name
            if "class_weight" in name:
                assert run.data.metrics["eval_train/loss"] == pytest.approx(
                    weighted_loss(model), rel=1e-5)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_an_explicit_tracker_beside_mlflow_autolog(sqlite_uri, model, flavor):
    tracker = gaptrack.GapTracker((X, Y), batch_size=16)
    callbacks = [tracker]
    mlflow_autolog(flavor)
    try:
        run, history = fit_in_one_run(
            lambda: model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks))
    finally:
        mlflow_autolog(flavor, disable=True)
    # MLflow's Keras autolog appends its callback to the user's list (as it does alone)
    assert callbacks[0] is tracker and len(callbacks) == (2 if flavor == "keras" else 1)
    assert tracker.run_id == run.info.run_id
    assert_both(run, history, flavor)
    assert run.data.metrics["eval_train/loss"] == pytest.approx(
        model.evaluate(X, Y, verbose=0, return_dict=True)["loss"], rel=1e-5)


def test_enabled_and_disabled_again_in_either_order(sqlite_uri, model):
    original = keras.Model.fit

    def fit():
        before = run_ids()
        with mlflow.start_run() if not mlflow.active_run() else contextlib.nullcontext():
            history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
        new = run_ids() - before
        return MlflowClient().get_run(new.pop()) if new else None, history

    def keys(run):
        return {"mlflow": "loss" in run.data.metrics, "gaptrack": "fit/loss" in run.data.metrics}

    mlflow_autolog("keras")
    gaptrack.autolog()
    run, history = fit()
    assert_both(run, history, "keras")
    mlflow_autolog("keras", disable=True)  # MLflow reverts its patch: gaptrack's stays
    run, history = fit()
    assert keys(run) == {"mlflow": False, "gaptrack": True}
    assert_both(run, history, "keras", mlflow_keys=False)
    gaptrack.autolog(disable=True)
    assert keras.Model.fit is original
    run, _ = fit()
    assert keys(run) == {"mlflow": False, "gaptrack": False}

    gaptrack.autolog()
    mlflow_autolog("keras")
    gaptrack.autolog(disable=True)  # under MLflow's patch: it passes calls on
    run, history = fit()
    assert keys(run) == {"mlflow": True, "gaptrack": False}
    gaptrack.autolog()  # on again, still under MLflow's patch: not added twice
    run, history = fit()
    assert_both(run, history, "keras")
    assert len(history_of(run.info.run_id, "gap/loss")) == 2
    mlflow_autolog("keras", disable=True)
    gaptrack.autolog(disable=True)
    assert keras.Model.fit is original and "fit" not in vars(keras.Model)


@pytest.mark.parametrize(("flavor", "order"), [("keras", "gaptrack_first"),
                                               ("tensorflow", "mlflow_first")])
def test_inside_the_users_run_and_a_nested_one(sqlite_uri, model, flavor, order):
    with both_autologs(flavor, order):
        with mlflow.start_run() as parent:
            history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
            with mlflow.start_run(nested=True) as child:
                nested = model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    assert run_ids() == {parent.info.run_id, child.info.run_id}
    client = MlflowClient()
    assert_both(client.get_run(parent.info.run_id), history, flavor)
    assert_both(client.get_run(child.info.run_id), nested, flavor)
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.parametrize("flavor", FLAVORS)
def test_keras_own_callbacks_keep_working(sqlite_uri, model, flavor, tmp_path):
    callbacks = [
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), monitor="loss",
                                        save_weights_only=True, save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                          min_delta=10.0),  # halves every epoch
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tensorboard")),
        keras.callbacks.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True),
    ]
    lr = float(model.optimizer.learning_rate.numpy())
    with both_autologs(flavor, "mlflow_first"):
        run, history = fit_in_one_run(lambda: model.fit(X, Y, batch_size=16, epochs=2,
                                                        verbose=0, callbacks=callbacks))
    reduced = float(model.optimizer.learning_rate.numpy())
    model.optimizer.learning_rate.assign(lr)
    assert_both(run, history, flavor)  # learning_rate too: ReduceLROnPlateau logs it
    assert "learning_rate" in history.history and reduced == pytest.approx(lr / 2)
    logged = np.genfromtxt(tmp_path / "log.csv", delimiter=",", names=True)
    assert np.allclose(logged["loss"], history.history["loss"], rtol=1e-6)
    assert (tmp_path / "best.weights.h5").exists()
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_functional_model_with_gaptrack_enabled_first(sqlite_uri):
    """keras.Model(inputs, outputs) is a Functional: gaptrack's wrapper on its class
    runs before MLflow's Keras patch enabled later, which alone fails on a tuple of
    callbacks and on callbacks=None."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((X.shape[1],))
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Dense(8, activation="relu")(inputs))
    functional = keras.Model(inputs, outputs)
    functional.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    with both_autologs("keras", "gaptrack_first"):
        for callbacks in ((), None):
            run, history = fit_in_one_run(lambda: functional.fit(
                X, Y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks))
            assert_both(run, history, "keras")
            assert run.data.metrics["eval_train/loss"] == pytest.approx(
                functional.evaluate(X, Y, verbose=0, return_dict=True)["loss"], rel=1e-5)
