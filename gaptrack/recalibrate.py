"""``recalibrate_bn``: PreciseBN for Keras — recompute BN statistics in place.

Keras has no equivalent of fvcore's ``update_bn_stats`` or PyTorch's
``torch.optim.swa_utils.update_bn``. This one sets the ``moving_mean`` and
``moving_variance`` of every BatchNormalization layer that trains to the
population statistics of its input over ``data`` (see :mod:`gaptrack.bn` for the
arithmetic), computed by the very training-mode pass that
:func:`gaptrack.measure` runs. After it, ``model.evaluate(data)`` equals the
``precise_bn`` value ``measure()`` reported before it. Frozen layers, weights,
optimizer and metric state are not touched.

Under a ``tf.distribute`` strategy the batch statistics are those of each
replica's shard (:mod:`gaptrack.distribute`), and every replica's copy of the
moving statistics is set: the replicas agree again, and ``evaluate()`` under the
strategy no longer depends on the batch size.
"""

import numpy as np
import pandas as pd

from gaptrack.bn import staleness
from gaptrack.keras3 import require_keras3
from gaptrack.measurement import Measurer
from gaptrack.probe import Probe


def recalibrate_bn(model, data, batch_size=32, *, probe_size=None, seed=0):
    """Recompute the moving statistics of the model's training BN layers.

    Args:
        model: a compiled Keras model.
        data: training data, as :func:`gaptrack.measure` takes it.
        batch_size: the training batch size (batch statistics depend on it; the
            global batch under a strategy).
        probe_size: use at most this many samples (a seeded sample of larger data).
        seed: seed of the sample and of the Dropout masks during the pass.

    Returns:
        A DataFrame, one row per BN layer: ``layer``, ``trains``,
        ``recalibrated``, and the staleness (:mod:`gaptrack.bn`) ``mean`` and
        ``var`` before and after (0 after for the layers recalibrated).

    Example:
        >>> table = gaptrack.recalibrate_bn(model, (x_train, y_train), batch_size=512)
        >>> model.evaluate(x_train, y_train)   # now with accurate BN statistics
    """
    require_keras3(model, "gaptrack.recalibrate_bn()")
    probe = Probe.from_data(data, probe_size=probe_size, seed=seed)
    measurer = Measurer(model, batch_size, seed=seed)
    _, population, trains_list = measurer.train_mode_pass(probe)
    rows = []
    for i, bn in enumerate(measurer.bn_layers):
        layer = bn.layer
        before = after = (float("nan"), float("nan"))
        stats = population[i]
        trains = trains_list[i]
        if stats is not None:
            mean, var = stats
            before = staleness(layer.moving_mean.numpy(), layer.moving_variance.numpy(),
                               mean, var, layer.epsilon)
            if trains:
                layer.moving_mean.assign(np.reshape(mean, layer.moving_mean.shape))
                layer.moving_variance.assign(np.reshape(var, layer.moving_variance.shape))
            after = staleness(layer.moving_mean.numpy(), layer.moving_variance.numpy(),
                              mean, var, layer.epsilon)
        rows.append({
            "layer": bn.path, "trains": trains, "recalibrated": bool(trains and stats is not None),
            "staleness_mean_before": before[0], "staleness_var_before": before[1],
            "staleness_mean_after": after[0], "staleness_var_after": after[1],
        })
    return pd.DataFrame(rows, columns=[
        "layer", "trains", "recalibrated", "staleness_mean_before", "staleness_var_before",
        "staleness_mean_after", "staleness_var_after",
    ])
