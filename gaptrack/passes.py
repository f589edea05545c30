"""The two compiled passes over the probe, as TensorFlow graphs.

- The **training-mode pass** runs the probe in batches of the training batch
  size with ``training=True`` (Dropout masks from fixed seeds, BN with batch
  statistics), accumulating the compiled metrics and each BN layer's input
  moments (the PreciseBN sums). It runs many training batches per call, in a
  graph loop, batch after batch exactly as separate calls would: the Python
  round trip of a call (a few ms with the metric, seed and BN-sum tensors going
  in and out) used to cost more than the forward of a small batch itself.
- The **inference step** runs one batch with ``training=False`` twice: with the
  model's BN moving statistics (``eval_train``) and, when given, with population
  statistics in their place (``precise_bn``); it also accumulates the moments of
  the per-sample loss (its standard error).

Nothing here changes the model: every call is ``stateless_call`` on values
(:mod:`gaptrack.keras_private`).

Tracing costs more than a pass over a 6,000-sample probe, so each function is
traced once: the passes of a model are kept (:func:`compiled_passes`) for as
long as the model lives and its state layout stays the same, shared by every
:class:`gaptrack.measurement.Measurer`, hence by ``measure()``, ``GapTracker``
and ``recalibrate_bn``; and :func:`call` runs every batch, the last partial one
included, through one trace with the batch dimension unknown, as in ``fit()``.
"""

import weakref

from gaptrack import keras_private
from gaptrack.bn import watch_inputs

#: ``{model: (layout signature, {training batch size: CompiledPasses})}``; an
#: entry goes with its model (the passes hold it weakly).
_CACHE = weakref.WeakKeyDictionary()


def compiled_passes(model, bn_layers, batch_size, layout, replicas=1, loss=None):
    """The :class:`CompiledPasses` of ``model`` at ``batch_size``, built once.

    ``layout`` is what the traces depend on besides the batch size (the
    compiled loss, metrics and optimizer, the variables, the BN layers'
    flags): when it changes, the model's passes are dropped and built again.
    """
    signature, by_batch_size = _CACHE.get(model, (None, None))
    if signature != layout:
        by_batch_size = {}
        _CACHE[model] = (layout, by_batch_size)
    if batch_size not in by_batch_size:
        by_batch_size[batch_size] = CompiledPasses(model, bn_layers, batch_size, replicas, loss)
    return by_batch_size[batch_size]


def call(function, data, *state):
    """``function(*data, *state)`` through the trace of ``function`` whose
    ``data`` (``x, y, sample_weight``) have an unknown batch dimension.

    As in ``fit()``, the batch dimension is unknown when traced (Keras'
    per-output loss trackers weight batches only when it is known), and one
    trace serves every batch and chunk size: the function is traced on its
    first call only.
    """
    import tensorflow as tf
    from keras import tree

    specs = tree.map_structure(
        lambda a: None if a is None else tf.TensorSpec((None,) + tuple(a.shape[1:]),
                                                       tf.as_dtype(a.dtype)), data)
    return function.get_concrete_function(*specs, *state)(*data, *state)


class CompiledPasses:
    """The traced passes for one model state layout and training batch size.

    Built by :func:`compiled_passes`; run through :func:`call`.

    Args:
        model: a built, compiled Keras model (held weakly).
        bn_layers: its :class:`gaptrack.bn.BNLayer` list.
        batch_size: the training batch size (the global batch under a strategy).
        replicas: replicas in sync: each normalised its shard of the batch
            (:func:`gaptrack.bn.watch_inputs`).
        loss: the loss of a model compiled without one (see
            :func:`gaptrack.keras_private.stateless_forward`), or ``None``.
    """

    def __init__(self, model, bn_layers, batch_size, replicas=1, loss=None):
        import tensorflow as tf

        self._model = weakref.ref(model)
        self.bn_layers = bn_layers
        self.batch_size = batch_size
        self.replicas = replicas
        self.loss = loss
        self.seed_index = keras_private.seed_indices(model)
        position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self.bn_index = [(position[id(bn.layer.moving_mean)], position[id(bn.layer.moving_variance)])
                         for bn in bn_layers]
        #: ``{id(layer): whether it used batch statistics}``, read while tracing.
        self.trains = {}
        # No AutoGraph, as Keras' own step functions (``do_not_convert``): the
        # loop is an explicit tf.while_loop, and converting Keras' code took
        # half the tracing time.
        self.train_chunk = tf.function(self._train_chunk, reduce_retracing=True, autograph=False)
        self.infer_step = tf.function(self._infer_step, reduce_retracing=True, autograph=False)

    @property
    def model(self):
        """The model (a weak reference: the passes do not keep it alive)."""
        return self._model()

    def _train_step(self, x, y, sw, metric_values, seeds, sums):
        model = self.model
        non_trainable = [v.value for v in model.non_trainable_variables]
        for i, seed in zip(self.seed_index, seeds):
            non_trainable[i] = seed
        with watch_inputs(self.bn_layers, self.replicas) as record:
            new_nt, metric_values, _, _ = keras_private.stateless_forward(
                model, x, y, sw, non_trainable, metric_values, training=True, loss=self.loss)
        new_sums = []
        for bn, (count, mean_sum, var_sum) in zip(self.bn_layers, sums):
            if id(bn.layer) not in record:  # the layer is not on this forward path
                self.trains[id(bn.layer)] = False
                new_sums.append((count, mean_sum, var_sum))
                continue
            trains, mean, var, n = record[id(bn.layer)]
            self.trains[id(bn.layer)] = trains
            new_sums.append((count + n, mean_sum + n * mean, var_sum + n * var))
        return metric_values, [new_nt[i] for i in self.seed_index], new_sums

    def _train_chunk(self, x, y, sw, metric_values, seeds, sums):
        """:meth:`_train_step` over the consecutive training batches of one chunk
        (whole batches; the last chunk may end with a partial one). Returns the
        logs of the metric state at the end."""
        import tensorflow as tf
        from keras import tree

        b = self.batch_size
        n = tf.shape(next(a for a in tree.flatten(x) if a is not None))[0]

        def body(i, metric_values, seeds, sums):
            batch = tree.map_structure(
                lambda a: None if a is None else a[i * b:(i + 1) * b], (x, y, sw))
            metric_values, seeds, sums = self._train_step(*batch, metric_values, seeds, sums)
            return i + 1, metric_values, seeds, sums

        _, metric_values, seeds, sums = tf.while_loop(
            lambda i, *_: i * b < n, body, (tf.constant(0), metric_values, seeds, sums))
        return metric_values, seeds, sums, keras_private.metrics_result(self.model, metric_values)

    def _infer_step(self, x, y, sw, eval_values, pbn_values, population, moments):
        model = self.model
        non_trainable = [v.value for v in model.non_trainable_variables]
        _, eval_values, eval_logs, y_pred = keras_private.stateless_forward(
            model, x, y, sw, non_trainable, eval_values, training=False, loss=self.loss)
        moments = self._loss_moments(moments, y, y_pred, sw)
        if population is None:
            return eval_values, None, eval_logs, None, moments
        for i, (mean, var) in population.items():
            i_mean, i_var = self.bn_index[i]
            non_trainable[i_mean] = mean
            non_trainable[i_var] = var
        _, pbn_values, pbn_logs, _ = keras_private.stateless_forward(
            model, x, y, sw, non_trainable, pbn_values, training=False, loss=self.loss)
        return eval_values, pbn_values, eval_logs, pbn_logs, moments

    def _loss_moments(self, moments, y, y_pred, sw):
        """Running ``(n, sum l, sum l^2)`` of the per-sample compiled loss ``l``.

        Only for a single output with one compiled loss (the per-sample values
        of several weighted outputs are not defined by Keras); else ``None``.
        """
        from keras import ops, tree

        loss_fn = keras_private.single_loss_function(self.model)
        if moments is None or loss_fn is None or tree.is_nested(y_pred) or tree.is_nested(y):
            return None
        values = ops.cast(loss_fn.call(y, y_pred), "float64")
        if len(values.shape) > 1:
            values = ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=1)
        if sw is not None:
            values = values * ops.reshape(ops.cast(sw, "float64"), (-1,))
        n, total, squares = moments
        return (n + ops.cast(ops.shape(values)[0], "float64"), total + ops.sum(values),
                squares + ops.sum(values * values))

