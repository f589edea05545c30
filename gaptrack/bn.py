"""BatchNormalization layers: finding them, watching their inputs, and how stale
their moving statistics are.

In training, a BN layer normalises with the mean and variance of the current
batch and moves ``moving_mean``/``moving_variance`` towards them by
``(1 - momentum)`` per step. In inference (``evaluate()``, ``predict()``) it
normalises with the moving statistics. When those lag behind the statistics of
the data the layer actually sees (few steps, momentum close to 1, weights that
move fast), ``evaluate()`` on the training data looks worse than ``fit()``.

**Population statistics** (PreciseBN, Wu & Johnson 2021, as in fvcore's
``precise_bn.py``): the probe is run through the model in training mode, in
batches of the training batch size ``B``; for batch ``k`` of ``n_k`` samples the
layer input's per-channel mean ``mu_k`` and variance ``s2_k`` are taken exactly
as the layer takes them in training (Keras: the biased variance, divided by the
number of elements, no Bessel correction). The population statistics are the
batch-size-weighted means::

    mean = sum_k n_k * mu_k / sum_k n_k        var = sum_k n_k * s2_k / sum_k n_k

which is what the moving averages would converge to if the weights stopped
moving. (``var`` is the mean within-batch variance, not the variance of the whole
probe: it is what the layer saw in training at batch size ``B``.)

**Staleness**, per layer, both scale-free (unchanged if the layer's input is
multiplied by a constant), logged as ``staleness/mean/<layer>`` and
``staleness/var/<layer>``::

    mean = mean over channels |moving_mean - mean| / sqrt(var + epsilon)
    var  = mean over channels |log(moving_variance + epsilon) - log(var + epsilon)|

The first is the shift, in population standard deviations, that inference
applies wrongly; the second the log-ratio of the scales (0.69 is a factor 2).

A layer **trains** when a training-mode call uses its batch statistics: Keras 3
does so when the layer is ``trainable`` and is called with ``training=True``.
This is read off the call itself, not guessed from flags. A frozen layer
(``trainable=False``, the transfer-learning idiom) or one a subclassed model
calls with ``training=False`` uses its moving statistics; it is listed and
flagged, never recalibrated. (In a *functional* model, Keras 3 lets the outer
``training=True`` override an inner ``base(x, training=False)``, so such a layer
does train, and is reported so.)
"""

import contextlib
from dataclasses import dataclass

import numpy as np

from gaptrack import keras_private
from gaptrack.distribute import shard_sizes
from gaptrack.keys import layer_key


@dataclass(eq=False)
class BNLayer:
    """One BatchNormalization layer of a model, keyed by object.

    Attributes:
        layer: the Keras layer itself.
        path: unique, stable display path (``outer/inner/bn``); sibling layers
            with one name (two copies of a nested model) get ``name:2``, ``:3``...
        key: ``path`` as the ``<layer>`` of its metric keys, unique in the model
            (:func:`gaptrack.keys.layer_key`).
    """

    layer: object
    path: str
    key: str


def find_bn_layers(model):
    """Every BatchNormalization layer of ``model``, nested models included.

    Walks sub-layers depth first in their order in the model. A layer object
    shared by two parents is listed once, under the first path it is reached by.
    ``BatchNormalization(synchronized=True)`` counts; LayerNormalization and
    GroupNormalization do not.

    Example:
        >>> [bn.path for bn in find_bn_layers(model)]
        ['features/block1_bn', 'features:2/block1_bn', 'head_bn']
    """
    from keras import layers

    found, seen, keys = [], set(), set()

    def walk(layer, prefix):
        names = {}
        for child in keras_private.child_layers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            count = names[child.name] = names.get(child.name, 0) + 1
            name = child.name if count == 1 else f"{child.name}:{count}"
            path = f"{prefix}{name}"
            if isinstance(child, layers.BatchNormalization):
                found.append(BNLayer(child, path, layer_key(path, keys)))
            walk(child, path + "/")

    walk(model, "")
    return found


@contextlib.contextmanager
def watch_inputs(bn_layers, replicas=1):
    """Record, while tracing, each layer's batch moments and whether it trains.

    Inside the block every listed layer's ``call`` is wrapped; each call stores
    ``(trains, mean, variance, n)`` in the returned dict under the layer's
    ``id``: the moments of the layer's input as the layer takes them in
    training (when it trains, the very moments it normalises with, not a
    second computation of them), and the number of samples.

    With ``replicas`` > 1 (training under a ``tf.distribute`` strategy, see
    :mod:`gaptrack.distribute`), a layer that trains and is not
    ``synchronized`` normalises each replica's shard of the batch with the
    shard's own moments, as each replica did in ``fit()``; the recorded moments
    are the shards' moments weighted by their sizes, so the population
    statistics are those of the batches the replicas normalised with.
    Meant for use around a traced function: the tensors belong to its graph.
    """
    from keras import ops

    record = {}
    for bn in bn_layers:
        layer = bn.layer

        def call(inputs, training=None, mask=None, _layer=layer, _call=layer.call):
            trains = bool(training) and _layer.trainable
            n = ops.cast(ops.shape(inputs)[0], "float32")
            if not (trains and replicas > 1 and not _layer.synchronized):
                with keras_private.moments_taken(_layer) as taken:
                    outputs = _call(inputs, training=training, mask=mask)
                if taken:
                    mean, var = taken[-1]
                else:
                    mean, var = keras_private.batch_moments(_layer, ops.cast(inputs, "float32"),
                                                            mask)
                record[id(_layer)] = (bool(taken), _flat32(mean), _flat32(var), n)
                return outputs
            outputs, mean_sum, var_sum, start = [], 0.0, 0.0, 0
            for size in shard_sizes(ops.shape(inputs)[0], replicas):
                x = inputs[start:start + size]
                m = None if mask is None else mask[start:start + size]
                mean, var = keras_private.batch_moments(_layer, ops.cast(x, "float32"), m)
                weight = ops.cast(size, "float32")
                # an empty shard has NaN moments and no weight
                mean_sum += ops.where(weight > 0, weight * ops.reshape(mean, (-1,)), 0.0)
                var_sum += ops.where(weight > 0, weight * ops.reshape(var, (-1,)), 0.0)
                outputs.append(_call(x, training=training, mask=m))
                start += size
            record[id(_layer)] = (trains, mean_sum / n, var_sum / n, n)
            return ops.concatenate(outputs, axis=0)

        layer.call = call
    try:
        yield record
    finally:
        for bn in bn_layers:
            # Removes the instance attribute, so the class's ``call`` is back.
            object.__delattr__(bn.layer, "call")


def _flat32(moment):
    """A layer's batch moment as a float32 vector (no op where it is one already)."""
    from keras import ops

    moment = ops.cast(moment, "float32")
    return moment if len(moment.shape) == 1 else ops.reshape(moment, (-1,))


def staleness(moving_mean, moving_variance, mean, variance, epsilon):
    """The ``(mean, var)`` staleness of one layer; see the module docstring."""
    moving_mean, moving_variance, mean, variance = (
        np.asarray(a, dtype=np.float64) for a in (moving_mean, moving_variance, mean, variance)
    )
    shift = np.mean(np.abs(moving_mean - mean) / np.sqrt(variance + epsilon))
    scale = np.mean(np.abs(np.log(moving_variance + epsilon) - np.log(variance + epsilon)))
    return float(shift), float(scale)


@dataclass(eq=False)
class BNStatistics:
    """One BN layer's state and its population statistics on the probe.

    Arrays are per channel (flattened when the layer normalises over several
    axes). ``gamma``/``beta`` are ``None`` when the layer has no scale/offset.
    """

    path: str
    key: str
    trains: bool
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    gamma: object
    beta: object
    epsilon: float

    @property
    def staleness(self):
        """``(mean, var)``: how stale the layer's moving statistics are."""
        return staleness(self.moving_mean, self.moving_variance, self.mean, self.variance,
                         self.epsilon)
