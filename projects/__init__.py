"""Training scenarios: the cases from the field where ``fit()`` and ``evaluate()``
disagree on the training data, each in a small module that builds its data and
its model and says in its docstring what it reproduces.

The MLflow project's entry points run them (``python -m projects.run``, from the
project root; see ``MLproject`` and ``docs/project.md``).

A scenario module has:

- ``PARAMS``: ``{name: projects.params.Param}``, the parameters it accepts and
  their defaults (the case it reproduces);
- optionally ``data(config) -> projects.training.Data``, what it trains on, when
  it is not the data set cut to ``samples`` and split for validation
  (:func:`projects.training.load`);
- ``model(config, data) -> keras.Model``: compiled, built after the seed is set;
- optionally ``fit(model, data, config, track)``, when training is not one
  ``model.fit`` on arrays (``track(probe_data)`` returns the run's
  :class:`gaptrack.GapTracker`; or it turns on ``gaptrack.autolog()``).

Scenario modules import Keras inside their functions, so that checking the
parameters (and ``--help``) does not wait for TensorFlow to load.
"""

import importlib

SCENARIOS = ("batchnorm", "deep_mlp", "dense_l2", "dropout", "softmax_only", "toy_binary",
             "transfer")


def scenario(name):
    """The module of scenario ``name`` (one of :data:`SCENARIOS`)."""
    if name not in SCENARIOS:
        raise ValueError(f"scenario {name!r} is unknown; choose one of: {', '.join(SCENARIOS)}")
    return importlib.import_module(f"projects.{name}")
