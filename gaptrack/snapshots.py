"""BN moving-statistic snapshots: one Parquet table per tracked epoch.

Each row is one channel of one BatchNormalization layer at one epoch:

========================  ==========================================================
``epoch``                 0-based epoch (the MLflow step)
``layer``                 the layer's unique display path (:mod:`gaptrack.bn`)
``channel``               channel index
``moving_mean``           the layer's ``moving_mean`` at epoch end
``moving_variance``       the layer's ``moving_variance`` at epoch end
``population_mean``       the probe's population mean of the layer input (PreciseBN)
``population_variance``   the probe's population variance of the layer input
``gamma``, ``beta``       scale and offset (NaN when the layer has none)
``trains``                whether the layer uses batch statistics in training
========================  ==========================================================

The size is O(channels), never O(samples). Each epoch's table is its own artifact
``gaptrack/bn_snapshots/epoch_NNNNN.parquet`` (:func:`gaptrack.keys.snapshot_path`), logged with the epoch, so a run
that stops early keeps the epochs it finished. :func:`load_bn_snapshots` reads
them back as one DataFrame.
"""

import os
import tempfile

import numpy as np
import pandas as pd

from gaptrack.keys import SNAPSHOT_DIR

COLUMNS = ("epoch", "layer", "channel", "moving_mean", "moving_variance",
           "population_mean", "population_variance", "gamma", "beta", "trains")


class SnapshotError(LookupError):
    """No snapshots can be read for the run asked for."""


def snapshot_frame(epoch, bn_statistics):
    """The snapshot table of one epoch from :class:`gaptrack.bn.BNStatistics`."""
    frames = []
    for stats in bn_statistics:
        channels = len(stats.moving_mean)
        frames.append(pd.DataFrame({
            "epoch": np.full(channels, epoch, dtype=np.int64),
            "layer": [stats.path] * channels,
            "channel": np.arange(channels, dtype=np.int64),
            "moving_mean": stats.moving_mean,
            "moving_variance": stats.moving_variance,
            "population_mean": np.asarray(stats.mean, dtype=np.float64),
            "population_variance": np.asarray(stats.variance, dtype=np.float64),
            "gamma": np.full(channels, np.nan) if stats.gamma is None else stats.gamma,
            "beta": np.full(channels, np.nan) if stats.beta is None else stats.beta,
            "trains": np.full(channels, bool(stats.trains)),
        }))
    return pd.concat(frames, ignore_index=True) if frames else None


def load_bn_snapshots(run_id, tracking_uri=None):
    """All BN snapshots of a run, as one DataFrame ordered by epoch.

    Args:
        run_id: the MLflow run.
        tracking_uri: the tracking server or store; default: MLflow's current one
            (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).

    Returns:
        A DataFrame with the columns of the module docstring.

    Raises:
        SnapshotError: the run does not exist, or has no snapshots (no
            BatchNormalization layer, or snapshots turned off).

    Example:
        >>> df = gaptrack.load_bn_snapshots(run.info.run_id)
        >>> df[df.epoch == df.epoch.max()].groupby("layer").moving_mean.mean()
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from gaptrack.uris import TrackingURIError, open_client, redact_uri

    try:
        client, uri = open_client(tracking_uri)
    except TrackingURIError as e:
        raise SnapshotError(str(e)) from None
    try:
        client.get_run(run_id)
    except MlflowException:
        raise SnapshotError(f"run {run_id!r} not found at tracking URI "
                            f"{redact_uri(uri)!r}") from None
    files = [f for f in client.list_artifacts(run_id, SNAPSHOT_DIR)
             if f.path.endswith(".parquet")]
    if not files:
        raise SnapshotError(
            f"run {run_id!r} has no BN snapshots under {SNAPSHOT_DIR!r} (its model has no "
            "BatchNormalization layer, or it was tracked with bn_snapshots=False)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=SNAPSHOT_DIR, dst_path=tmp, tracking_uri=uri
        )
        frames = [pd.read_parquet(os.path.join(local, os.path.basename(f.path)))
                  for f in sorted(files, key=lambda f: f.path)]
    return pd.concat(frames, ignore_index=True).sort_values(
        "epoch", kind="stable", ignore_index=True
    )
