"""Where the entry points' runs land, and how to open them in the MLflow UI.

Where. ``mlflow run .`` creates its run before the entry point starts, in the
experiment given by ``--experiment-name``/``--experiment-id`` (or
``MLFLOW_EXPERIMENT_NAME``/``MLFLOW_EXPERIMENT_ID``), else in ``Default``
(id ``0``), and tells the entry point with ``MLFLOW_EXPERIMENT_ID`` and
``MLFLOW_RUN_ID``. The runs of ``main`` and ``sweep`` are children of that run,
so they must be in its experiment: an experiment of the project's own could not
hold them without changing the README's command (``--experiment-name``), and a
parent in ``Default`` with its children elsewhere would split the grid in the
UI. So the runs stay where ``mlflow run`` put them, and that experiment is
declared a model-training one (:func:`declare_kind`).

The kind. The tag ``mlflow.experimentKind=custom_model_development`` declares
an experiment as "Machine learning" rather than "GenAI apps & agents". It is
set when the experiment has no kind yet (``Default`` with plain ``mlflow run
.``, or an experiment ``mlflow run --experiment-name`` has just created); a
kind already there, whoever set it, is kept.

Opening it. The MLflow 3.17.2 UI does not choose the experiment page from the
tag: a browser that has never switched the sidebar's "GenAI | Model training"
toggle opens every experiment, tagged or not, on the GenAI overview (traces,
token usage). The URL :func:`runs_url` builds carries
``workflowType=machine_learning``, which opens it on the runs table; the entry
points print it (:func:`where`).
"""

from urllib.parse import urlparse

#: MLflow's experiment tag for the kind of work an experiment holds, and the
#: value for model training (as MLflow's UI spells them).
KIND_TAG = "mlflow.experimentKind"
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
#: Where ``mlflow ui`` and ``mlflow server`` listen by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def declare_kind(experiment_id):
    """Tag the experiment ``custom_model_development`` unless it has a kind;
    returns the kind it has after the call."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    kind = client.get_experiment(experiment_id).tags.get(KIND_TAG)
    if kind is None:
        client.set_experiment_tag(experiment_id, KIND_TAG, CUSTOM_MODEL_DEVELOPMENT)
        kind = CUSTOM_MODEL_DEVELOPMENT
    return kind


def _is_server(tracking_uri):
    return urlparse(tracking_uri).scheme in ("http", "https")


def runs_url(experiment_id, tracking_uri):
    """The UI's page of the experiment's runs: on the tracking server itself
    when ``tracking_uri`` is one, else at ``mlflow ui``'s default address."""
    base = tracking_uri.rstrip("/") if _is_server(tracking_uri) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def where(run_id):
    """Two lines: the experiment and store that hold run ``run_id``, and how
    to open the experiment's runs in the UI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client, uri = MlflowClient(), mlflow.get_tracking_uri()
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    url = runs_url(experiment.experiment_id, uri)
    opening = (f"See them at {url}" if _is_server(uri) else
               f"See them: mlflow ui --backend-store-uri {uri}, then open {url}")
    return (f"The runs are in experiment {experiment.name!r} (id {experiment.experiment_id}) "
            f"of {uri}.\n{opening}")
