"""Training under a ``tf.distribute`` strategy: what each replica saw, and which
process logs.

Under ``MirroredStrategy`` (several devices of one machine) and
``MultiWorkerMirroredStrategy`` (several machines, each worker a process), every
training step splits the global batch of ``B`` samples into one shard per
replica. What changes for the measurements:

- **Batch statistics.** A BatchNormalization layer normalises, in training,
  with the moments of its replica's shard (``B / replicas`` samples), not of the
  global batch; ``BatchNormalization(synchronized=True)`` all-reduces the
  moments across replicas, and so normalises with the global batch. The
  training-mode pass splits each batch as the strategy does
  (:func:`shard_sizes`) for the layers that are not synchronized
  (:func:`gaptrack.bn.watch_inputs`).
- **Moving statistics.** Keras 3 keeps ``moving_mean``/``moving_variance`` as
  mirrored variables without aggregation: each replica moves its own copy
  towards its own shards' moments, so the copies drift apart (not with
  ``synchronized=True``, whose moments are the same on every replica).
  ``model.evaluate()`` under the strategy then normalises each shard with the
  copy of the replica it lands on, and its result depends on the batch size.
  ``get_weights()``, ``save()`` and every read outside a replica read the first
  replica's copy: that is the model that is kept, and the one ``eval_train``
  measures. :func:`bn_spread` says how far the copies are apart (the key
  ``replicas/bn_spread``).
- **JAX** (``keras.distribution``, e.g. ``DataParallel`` over several
  devices): the step is one program over the global batch, sharded by XLA, so
  a BN layer's moments are those of the global batch (as if ``synchronized``)
  and there is one copy of the moving statistics: the training-mode pass runs
  each global batch whole, and ``replicas/bn_spread`` is not logged.
- **One run per job.** Under ``MultiWorkerMirroredStrategy`` every worker runs
  the same ``fit()`` and the same callbacks; only the chief (:func:`is_chief`)
  may create and log the MLflow run (:class:`gaptrack.GapTracker`).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Replication:
    """How a model is trained: ``replicas`` in sync (1 without a strategy),
    whether this process is the chief, the one that logs, and ``shards``: how
    many parts of a training batch a BN layer that is not synchronized
    normalises separately (``replicas`` under ``tf.distribute``; 1 under a JAX
    ``keras.distribution``, whose computation is one program over the global
    batch, so every BN layer normalises with the global batch's moments)."""

    replicas: int
    chief: bool
    shards: int = 1


def replication(model):
    """The :class:`Replication` of ``model``: the strategy it was built under
    (``model.distribute_strategy`` on TensorFlow), or on JAX the
    ``keras.distribution`` in effect; else one replica."""
    strategy = _strategy(model)
    if strategy is not None:
        replicas = int(strategy.num_replicas_in_sync)
        return Replication(replicas=replicas, chief=is_chief(strategy), shards=replicas)
    distribution = _keras_distribution()
    if distribution is not None:
        import jax

        mesh = distribution.device_mesh
        axis = mesh.axis_names.index(distribution.batch_dim_name)
        return Replication(replicas=int(mesh.shape[axis]), chief=jax.process_index() == 0)
    return Replication(replicas=1, chief=True)


def _keras_distribution():
    """The ``keras.distribution`` in effect on JAX (the backend whose trainer
    applies it; see the module docstring), or ``None``."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    return keras.distribution.distribution()


def _strategy(model):
    return getattr(model, "distribute_strategy", None)


def is_chief(strategy):
    """Whether this process is the job's chief: the ``chief`` task of
    ``TF_CONFIG``'s cluster, else worker 0 when the cluster has no chief (the
    rule ``tf.distribute`` itself follows); every process of a single-worker
    strategy is."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    jobs = resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and "chief" not in jobs


def shard_sizes(n, replicas):
    """How the strategy splits a batch of ``n`` samples over ``replicas``:
    consecutive shards of ``ceil(n / replicas)`` samples, the last ones smaller
    or empty (``tf.distribute``'s rebatching: 41 over 3 is 14, 14, 13; 7 over 3
    is 3, 3, 1; 1 over 2 is 1, 0). ``n`` may be a tensor."""
    from keras import ops

    size = (n + replicas - 1) // replicas
    return [ops.minimum(ops.maximum(n - k * size, 0), size) for k in range(replicas)]


def replica_copies(model, variable):
    """Every local replica's copy of ``variable`` (one array without a
    strategy); under ``MultiWorkerMirroredStrategy``, this worker's replicas."""
    strategy = _strategy(model)
    if strategy is None:
        return [np.asarray(variable.numpy())]
    return [np.asarray(v.numpy()) for v in strategy.experimental_local_results(variable.value)]


def spread(means, variances, epsilon):
    """The largest scale-free difference between replicas' moving statistics
    of one layer, over channels and pairs of replicas::

        mean: max |moving_mean_i - moving_mean_j| / sqrt(v + epsilon)
        var:  max |log(moving_variance_i + epsilon) - log(moving_variance_j + epsilon)|

    ``v`` the replicas' average moving variance of the channel; the larger of
    the two. Both are the units of the staleness (:mod:`gaptrack.bn`): a shift in
    standard deviations, a log-ratio of scales. 0 when the copies agree.

    Args:
        means, variances: one array of channels per replica.
        epsilon: the layer's epsilon.
    """
    means = np.asarray(means, dtype=np.float64)
    log_var = np.log(np.asarray(variances, dtype=np.float64) + epsilon)
    scale = np.sqrt(np.mean(np.asarray(variances, dtype=np.float64), axis=0) + epsilon)
    shift = (means.max(axis=0) - means.min(axis=0)) / scale
    ratio = log_var.max(axis=0) - log_var.min(axis=0)
    return float(max(shift.max(initial=0.0), ratio.max(initial=0.0)))


def bn_spread(model, bn_layers):
    """``replicas/bn_spread``: the largest :func:`spread` over the BN layers that
    are not synchronized, or ``None`` when there is nothing to compare (fewer
    than two local replicas, or no such layer).

    Only the replicas of this process are compared: under
    ``MultiWorkerMirroredStrategy`` the other workers' copies would take a
    collective inside a callback (see :mod:`gaptrack.callback` for why the
    chief measures alone), so with one device a worker there is no spread.
    """
    spreads = []
    for bn in bn_layers:
        layer = bn.layer
        if getattr(layer, "synchronized", False):
            continue
        means = replica_copies(model, layer.moving_mean)
        if len(means) < 2:
            continue
        variances = replica_copies(model, layer.moving_variance)
        spreads.append(spread([m.reshape(-1) for m in means],
                              [v.reshape(-1) for v in variances], float(layer.epsilon)))
    return max(spreads) if spreads else None
