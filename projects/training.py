"""One scenario trained as one tracked MLflow run.

:func:`train` is what the ``train`` entry point runs, and what ``main`` and
``sweep`` run once per grid point (as nested runs). It loads the scenario's data,
starts (or, under ``mlflow run``, joins) the run, logs the parameters and the
training data as a dataset input, builds the model with the seed set, and trains
it with a :class:`gaptrack.GapTracker`.

What is logged besides what GapTracker logs (metrics and tags, no params):

- params: ``scenario``, every parameter of the scenario (defaults included),
  ``dataset_size`` (training samples of the data set as loaded),
  ``train_samples``/``validation_samples`` (what ``fit`` trains and validates on)
  and ``probe_samples`` (the probe's size). Under ``mlflow run`` the entry
  point's parameters are already logged, as the user typed them; a parameter
  already logged is not logged again, since MLflow refuses to change one.
- the training data as a dataset input (``mlflow.data.from_numpy``, context
  ``training``).
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from projects.params import ParamError


@dataclass
class Data:
    """What a scenario trains on.

    Attributes:
        name: the data set's name, as logged.
        source: where it came from (a path, or a description).
        x, y: the training samples ``fit`` trains on.
        validation: ``(x_val, y_val)`` or ``None``.
        num_classes: classes of the original labels.
        size: training samples of the data set as loaded, before any selection.
    """

    name: str
    source: str
    x: np.ndarray
    y: np.ndarray
    validation: tuple
    num_classes: int
    size: int


def load(config):
    """The scenario's data set, cut to ``samples`` and split for validation.

    The first ``samples`` training samples are kept (the built-in splits are
    already shuffled), and of those the last ``validation_split`` fraction is
    held out for validation, as ``fit(validation_split=...)`` would.
    """
    from projects.datasets import load_dataset

    ds = load_dataset(config["dataset"], seed=config["seed"])
    x, y = ds.x_train, ds.y_train
    samples = config.get("samples", "all")
    if samples != "all":
        if samples > len(x):
            raise ParamError(f"samples must be at most the {len(x)} training samples of "
                             f"{ds.name}, got {samples}")
        x, y = x[:samples], y[:samples]
    validation = None
    fraction = config.get("validation_split") or 0.0
    if fraction:
        split_at = int(math.floor(len(x) * (1.0 - fraction)))
        if split_at == 0 or split_at == len(x):
            raise ParamError(f"validation_split {fraction:g} of {len(x)} samples leaves "
                             f"{split_at} to train on and {len(x) - split_at} to validate on; "
                             "both must be > 0")
        x, y, validation = x[:split_at], y[:split_at], (x[split_at:], y[split_at:])
    return Data(ds.name, ds.source, x, y, validation, ds.num_classes, len(ds.x_train))


def default_fit(model, data, config, track):
    """``model.fit`` on the in-memory data, tracked, one log line per epoch."""
    model.fit(data.x, data.y, batch_size=config["batch_size"], epochs=config["epochs"],
              validation_data=data.validation, callbacks=[track((data.x, data.y))],
              verbose=2)


def train(name, config, *, nested=False, run_name=None):
    """Train scenario ``name`` with ``config`` in one MLflow run; returns its id.

    Args:
        name: the scenario (a module of :mod:`projects`).
        config: ``{param: value}``, every parameter of the scenario, checked.
        nested: start a child run of the active run (a grid point).
        run_name: the run's name (a new run only).
    """
    import mlflow

    from projects import scenario
    from projects.experiment import declare_kind

    module = scenario(name)
    data = getattr(module, "data", load)(config)
    with mlflow.start_run(nested=nested, run_name=run_name) as run:
        if not nested:  # a grid's parent has declared it
            declare_kind(run.info.experiment_id)
        log_new_params({"scenario": name, **config, "dataset_size": data.size,
                        "train_samples": len(data.x),
                        "validation_samples": 0 if data.validation is None
                        else len(data.validation[0])})
        log_input(data.x, data.y, data.name, data.source, context="training")

        import gaptrack
        import keras

        trackers = []

        def track(probe_data):
            tracker = gaptrack.GapTracker(probe_data, batch_size=config["batch_size"],
                                          probe_size=config["probe_size"], seed=config["seed"])
            trackers.append(tracker)
            return tracker

        keras.utils.set_random_seed(config["seed"])
        model = module.model(config, data)
        getattr(module, "fit", default_fit)(model, data, config, track)
        if trackers:
            log_new_params({"probe_samples": trackers[0].probe.size})
        else:  # gaptrack.autolog() tracked fit: the probe it drew, as logged
            from gaptrack.keys import PROBE_SIZE_TAG

            log_new_params({"probe_samples": mlflow.get_run(run.info.run_id).data.tags.get(
                PROBE_SIZE_TAG, 0)})
        return run.info.run_id


def log_new_params(params):
    """Log the params the active run does not have yet (values as text)."""
    import mlflow

    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {k: str(v) for k, v in params.items() if k not in logged}
    if new:
        mlflow.log_params(new)


def log_input(x, y, name, source, context):
    """Record ``(x, y)`` as a dataset input of the active run."""
    import os

    import mlflow

    # MLflow registers its local-file source twice and warns that a path "can be
    # interpreted in multiple ways"; both readings are the same source.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways.*")
        dataset = mlflow.data.from_numpy(x, targets=y, name=name,
                                         source=source if os.path.exists(source) else None)
    mlflow.log_input(dataset, context=context)
