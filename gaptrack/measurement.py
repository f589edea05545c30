"""The four measurements of one model state, without MLflow.

For one set of weights, on the probe (fixed training samples), per compiled
metric (``loss`` included, named as Keras names them):

- ``eval_train``: inference mode (``training=False``) with the weights and BN
  moving statistics as they are: what ``model.evaluate(probe)`` returns.
- ``train_mode``: training mode (Dropout active with seeded masks, BN normalising
  with the statistics of each batch), in batches of the training batch size, as
  a ``fit()`` step computes its loss, but with the weights frozen and no state
  changed: BN moving statistics, Dropout's seed state, metric and optimizer
  variables are bitwise identical afterwards (``model.stateless_call``).
- ``precise_bn``: inference mode with every BN layer that trains given the
  population statistics of its input over the probe (see :mod:`gaptrack.bn`),
  computed in the same training-mode pass as ``train_mode``; ``None`` when no
  BN layer trains. The model's own moving statistics are not touched.

Loss and metrics are computed with the model's own ``compute_loss`` (compiled
loss plus ``model.losses``: regularisers, ``add_loss``) and ``compute_metrics``,
on fresh copies of the metric state, and averaged over batches weighted by batch
size exactly as ``fit()`` and ``evaluate()`` do. Nothing a running ``fit()``
holds is reset, so a callback may measure mid-training.

Cost: one training-mode pass at the training batch size and one inference pass
(both inference forwards per batch) at a large batch size; inference results do
not depend on the batch size. The training-mode pass runs many training batches
per call, in a graph loop, batch after batch as separate calls would: the Python
round trip of a call (a few ms with the metric, seed and BN-sum tensors going in
and out) used to cost more than the forward of a small batch itself.

One exception, kept so that ``eval_train`` equals ``evaluate()``: Keras averages
the per-output losses of a multi-output model (``<output>_loss``) over batches
*without* weighting by batch size, so for such models the inference pass runs at
``evaluate()``'s default batch size, 32.
"""

from dataclasses import dataclass, field

import numpy as np

from gaptrack.bn import BNStatistics, find_bn_layers, watch_inputs
from gaptrack.probe import Probe

#: Largest batch used for the inference passes.
MAX_INFERENCE_BATCH = 1024
#: Bytes of input per inference batch it aims for (keeps large images in memory).
_INFERENCE_BATCH_BYTES = 64 * 2**20
#: Most training batches run by one call of the training-mode pass (a graph
#: loop over them; each call costs a Python round trip).
MAX_TRAIN_CHUNK_BATCHES = 256
#: Bytes of input per call of the training-mode pass it aims for.
_TRAIN_CHUNK_BYTES = 16 * 2**20
#: ``evaluate()``'s default batch size.
KERAS_EVALUATE_BATCH = 32


class MeasureError(ValueError):
    """The model or the arguments cannot be measured; the message says why."""


@dataclass
class Measurement:
    """The measurements of one model state on one probe.

    Attributes:
        eval_train, train_mode: ``{metric name: value}``.
        precise_bn: the same, or ``None`` when no BN layer trains.
        probe_size: samples measured.
        batch_size: the training batch size used for ``train_mode``/PreciseBN.
        bn: per BN layer, its state and population statistics
            (:class:`gaptrack.bn.BNStatistics`), in model order.
        loss_standard_error: standard error of ``eval_train["loss"]`` as the mean
            of per-sample losses, ``std / sqrt(n)`` (regularisers add a constant
            and no noise); ``None`` for multi-output models.
    """

    eval_train: dict
    train_mode: dict
    precise_bn: dict
    probe_size: int
    batch_size: int
    bn: list = field(default_factory=list)
    loss_standard_error: float = None

    def as_metrics(self):
        """The SPEC keys: ``eval_train/<m>``, ``train_mode/<m>``, ``precise_bn/<m>``."""
        out = {}
        for prefix in ("eval_train", "train_mode", "precise_bn"):
            for name, value in (getattr(self, prefix) or {}).items():
                out[f"{prefix}/{name}"] = value
        return out


def _check_batch_size(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise MeasureError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Measurer:
    """Compiled measurement passes for one model, reused epoch after epoch.

    Args:
        model: a compiled Keras model.
        batch_size: the training batch size (``fit``'s ``batch_size``).
        seed: seed of the Dropout masks in the training-mode pass; the same seed
            gives the same masks, so the value is reproducible.
        inference_batch_size: batch size of the inference passes; by default as
            large as fits in about 64 MB of input, at most 1024.

    Example:
        >>> measurer = Measurer(model, batch_size=32)
        >>> measurer.measure(Probe.from_data((x, y))).eval_train
        {'loss': 0.41, 'accuracy': 0.87}
    """

    def __init__(self, model, batch_size, seed=0, inference_batch_size=None):
        if not getattr(model, "compiled", False):
            raise MeasureError(
                f"model {model.name!r} is not compiled; call model.compile(optimizer, "
                "loss, metrics) first: gaptrack measures the loss and metrics it compiles"
            )
        if model._compile_loss is None and not model.losses:
            raise MeasureError(
                f"model {model.name!r} was compiled without a loss; gaptrack measures the "
                "loss and metrics that fit() reports: compile with loss=... (and metrics=...)"
            )
        self.model = model
        self.batch_size = _check_batch_size("batch_size", batch_size)
        if inference_batch_size is not None:
            inference_batch_size = _check_batch_size("inference_batch_size", inference_batch_size)
        self.inference_batch_size = inference_batch_size
        self.seed = seed
        self.bn_layers = find_bn_layers(model)
        self._signature = None

    # -- preparation -------------------------------------------------------------

    def _prepare(self, probe):
        """Build the model and its compiled metrics if needed, then (re)trace."""
        model = self.model
        first = next(probe.batches(self.batch_size))
        unbuilt = not model.built or (
            model._compile_metrics is not None and not model._compile_metrics.built
        ) or (model._compile_loss is not None and not model._compile_loss.built)
        if unbuilt:
            model._symbolic_build(data_batch=first)
        signature = (
            id(model._compile_metrics), id(model._compile_loss), id(model.optimizer),
            len(model.non_trainable_variables), len(model.metrics_variables),
            tuple(bn.layer.trainable for bn in self.bn_layers),
        )
        if signature == self._signature:
            return
        self._signature = signature
        nt_index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self._seed_index = [
            nt_index[id(sg.state)]
            for layer in model._flatten_layers(include_self=True)
            for sg in getattr(layer, "_seed_generators", [])
            if id(sg.state) in nt_index
        ]
        self._bn_index = [
            (nt_index[id(bn.layer.moving_mean)], nt_index[id(bn.layer.moving_variance)])
            for bn in self.bn_layers
        ]
        self._has_training_arg = model._call_has_training_arg
        self._trains = {}
        import tensorflow as tf

        self._train_fn = tf.function(self._train_chunk, reduce_retracing=True)
        self._infer_fn = tf.function(self._infer_step, reduce_retracing=True)

    def _fresh_metric_values(self):
        from keras.src.backend import StatelessScope

        variables = self.model.metrics_variables
        with StatelessScope(state_mapping=[(v, v.value) for v in variables]) as scope:
            self.model.reset_metrics()
        return [scope.get_current_value(v) for v in variables]

    def _seed_values(self):
        rng = np.random.default_rng(self.seed)
        variables = self.model.non_trainable_variables
        values = []
        for i in self._seed_index:
            v = variables[i]
            values.append(np.asarray(rng.integers(0, 2**31 - 1, size=v.shape), dtype=v.dtype))
        return values

    # -- traced steps ------------------------------------------------------------

    def _forward(self, x, y, sw, non_trainable, metric_values, training):
        """One batch: forward pass, loss and metric update, all stateless.

        Mirrors Keras' ``train_step``/``test_step`` (and JAX's stateless trainer):
        the loss tracker is weighted by the batch size; ``compute_metrics``
        updates the compiled metrics.
        """
        from keras import ops, tree
        from keras.src.backend import StatelessScope

        model = self.model
        # As in fit() and evaluate(), the batch dimension is unknown when traced
        # (Keras' per-output loss trackers weight batches only when it is known).
        x, y, sw = tree.map_structure(_relax_batch_dim, (x, y, sw))
        kwargs = {"training": training} if self._has_training_arg else {}
        y_pred, new_non_trainable, losses = model.stateless_call(
            model.trainable_variables, non_trainable, x, return_losses=True, **kwargs
        )
        if losses:
            model._losses_override.clear()
            model._losses_override = losses
        try:
            loss, (_, _, metric_values) = model.stateless_compute_loss(
                model.trainable_variables, new_non_trainable, metric_values,
                x=x, y=y, y_pred=y_pred, sample_weight=sw, training=training,
            )
        finally:
            if losses:
                model._losses_override.clear()
        mapping = list(zip(model.metrics_variables, metric_values))
        with StatelessScope(state_mapping=mapping) as scope:
            if model._loss_tracker is not None:
                n = ops.shape(next(a for a in tree.flatten(x) if a is not None))[0]
                model._loss_tracker.update_state(loss, sample_weight=n)
            logs = model.compute_metrics(x, y, y_pred, sample_weight=sw)
        metric_values = [scope.get_current_value(v) for v in model.metrics_variables]
        return new_non_trainable, metric_values, logs, (x, y, y_pred, sw)

    def _train_step(self, x, y, sw, metric_values, seeds, sums):
        model = self.model
        non_trainable = [v.value for v in model.non_trainable_variables]
        for i, seed in zip(self._seed_index, seeds):
            non_trainable[i] = seed
        with watch_inputs(self.bn_layers) as record:
            new_nt, metric_values, _, _ = self._forward(
                x, y, sw, non_trainable, metric_values, training=True
            )
        new_sums = []
        for bn, (count, mean_sum, var_sum) in zip(self.bn_layers, sums):
            if id(bn.layer) not in record:  # the layer is not on this forward path
                self._trains[id(bn.layer)] = False
                new_sums.append((count, mean_sum, var_sum))
                continue
            trains, mean, var, n = record[id(bn.layer)]
            self._trains[id(bn.layer)] = trains
            new_sums.append((count + n, mean_sum + n * mean, var_sum + n * var))
        new_seeds = [new_nt[i] for i in self._seed_index]
        return metric_values, new_seeds, new_sums

    def _train_chunk(self, x, y, sw, metric_values, seeds, sums):
        """:meth:`_train_step` over consecutive training batches of one chunk.

        The chunk holds whole training batches (the last chunk may end with a
        partial one); a graph loop runs them one after the other, batch by batch
        exactly as separate calls would, so the per-batch cost of a Python call
        is paid once per chunk. Returns the logs of the metric state at the end.
        """
        import tensorflow as tf
        from keras import tree
        from keras.src.backend import StatelessScope

        model = self.model
        b = self.batch_size
        n = tf.shape(next(a for a in tree.flatten(x) if a is not None))[0]

        def body(i, metric_values, seeds, sums):
            batch = tree.map_structure(
                lambda a: None if a is None else a[i * b:(i + 1) * b], (x, y, sw))
            metric_values, seeds, sums = self._train_step(*batch, metric_values, seeds, sums)
            return i + 1, metric_values, seeds, sums

        _, metric_values, seeds, sums = tf.while_loop(
            lambda i, *_: i * b < n, body, (tf.constant(0), metric_values, seeds, sums))
        with StatelessScope(state_mapping=list(zip(model.metrics_variables, metric_values))):
            logs = model.get_metrics_result()
        return metric_values, seeds, sums, logs

    def _infer_step(self, x, y, sw, eval_values, pbn_values, population, moments):
        model = self.model
        non_trainable = [v.value for v in model.non_trainable_variables]
        _, eval_values, eval_logs, batch = self._forward(
            x, y, sw, non_trainable, eval_values, training=False
        )
        moments = self._loss_moments(moments, *batch)
        if population is None:
            return eval_values, None, eval_logs, None, moments
        for i, (mean, var) in population.items():
            i_mean, i_var = self._bn_index[i]
            non_trainable[i_mean] = mean
            non_trainable[i_var] = var
        _, pbn_values, pbn_logs, _ = self._forward(
            x, y, sw, non_trainable, pbn_values, training=False
        )
        return eval_values, pbn_values, eval_logs, pbn_logs, moments

    def _loss_moments(self, moments, x, y, y_pred, sw):
        """Running ``(n, sum l, sum l^2)`` of the per-sample compiled loss ``l``.

        Only for a single output with one compiled loss (the per-sample values
        of several weighted outputs are not defined by Keras); else ``None``.
        """
        from keras import ops, tree

        compile_loss = self.model._compile_loss
        flat = getattr(compile_loss, "_flat_losses", None) or []
        if moments is None or len(flat) != 1 or tree.is_nested(y_pred) or tree.is_nested(y):
            return None
        loss_fn = flat[0][1]
        if not hasattr(loss_fn, "call"):
            return None
        values = ops.cast(loss_fn.call(y, y_pred), "float64")
        if len(values.shape) > 1:
            values = ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=1)
        if sw is not None:
            values = values * ops.reshape(ops.cast(sw, "float64"), (-1,))
        n, total, squares = moments
        return (n + ops.cast(ops.shape(values)[0], "float64"), total + ops.sum(values),
                squares + ops.sum(values * values))

    # -- passes ------------------------------------------------------------------

    def _inference_batch(self, probe):
        if self.inference_batch_size:
            return self.inference_batch_size
        compile_loss = self.model._compile_loss
        if compile_loss is not None and compile_loss.metrics:
            return KERAS_EVALUATE_BATCH
        per_sample = _bytes_per_sample(probe)
        return max(self.batch_size, min(MAX_INFERENCE_BATCH, _INFERENCE_BATCH_BYTES // per_sample))

    def _train_chunk_size(self, probe):
        """Samples per call of the training-mode pass: whole training batches,
        at most :data:`MAX_TRAIN_CHUNK_BATCHES` of them and about
        :data:`_TRAIN_CHUNK_BYTES` of input."""
        per_sample = _bytes_per_sample(probe)
        batches = min(MAX_TRAIN_CHUNK_BATCHES, _TRAIN_CHUNK_BYTES // (per_sample * self.batch_size))
        return self.batch_size * max(1, batches)

    def train_mode_pass(self, probe):
        """Training-mode metrics and per-layer population statistics.

        Returns:
            ``(metrics, population)``: ``{name: value}`` and, per BN layer index
            in :attr:`bn_layers`, ``(mean, variance)`` numpy arrays (``None`` for
            a layer not called on the forward path).
        """
        self._prepare(probe)
        import tensorflow as tf

        metric_values = self._fresh_metric_values()
        seeds = [tf.constant(s) for s in self._seed_values()]
        sums = []
        for bn in self.bn_layers:
            zeros = tf.zeros([int(np.prod(bn.layer.moving_mean.shape))], "float32")
            sums.append((tf.constant(0.0), zeros, zeros))
        logs = None
        for x, y, sw in probe.batches(self._train_chunk_size(probe)):
            metric_values, seeds, sums, logs = self._train_fn(
                x, y, sw, metric_values, seeds, sums
            )
        population = []
        for count, mean_sum, var_sum in sums:
            count = float(count)
            population.append(
                (mean_sum.numpy() / count, var_sum.numpy() / count) if count else None
            )
        return _to_floats(logs), population

    def trains(self, index):
        """Whether BN layer ``index`` used batch statistics in the last training pass."""
        return self._trains.get(id(self.bn_layers[index].layer), False)

    def inference_pass(self, probe, population=None):
        """``(eval_train, precise_bn)`` metrics; ``precise_bn`` is ``None`` unless
        ``population`` (``{bn index: (mean, variance)}``) is given.

        Also sets :attr:`loss_standard_error`: the standard error of the mean
        per-sample loss on the probe (``None`` where per-sample losses are not
        defined), the sampling noise of ``eval_train["loss"]``."""
        self._prepare(probe)
        import tensorflow as tf

        eval_values = self._fresh_metric_values()
        pbn_values = eval_values if population else None
        if population:
            variables = self.model.non_trainable_variables
            population = {
                i: tuple(tf.constant(s, dtype=variables[j].dtype) for s, j in zip(stats, idx))
                for i, stats in population.items()
                for idx in [self._bn_index[i]]
            }
        else:
            population = None
        eval_logs = pbn_logs = None
        moments = tuple(tf.constant(0.0, tf.float64) for _ in range(3))
        for x, y, sw in probe.batches(self._inference_batch(probe)):
            eval_values, pbn_values, eval_logs, pbn_logs, moments = self._infer_fn(
                x, y, sw, eval_values, pbn_values, population, moments
            )
        self.loss_standard_error = _standard_error(moments)
        return _to_floats(eval_logs), (_to_floats(pbn_logs) if population else None)

    def measure(self, probe):
        """All four measurements of the model's current state on ``probe``."""
        train_mode, population = self.train_mode_pass(probe)
        recalibrate = {
            i: stats for i, stats in enumerate(population)
            if stats is not None and self.trains(i)
        }
        eval_train, precise_bn = self.inference_pass(probe, recalibrate)
        bn = []
        for i, bnl in enumerate(self.bn_layers):
            layer = bnl.layer
            mean, var = population[i] if population[i] is not None else (None, None)
            if mean is None:
                mean = var = np.full(int(np.prod(layer.moving_mean.shape)), np.nan)
            bn.append(BNStatistics(
                path=bnl.path, key=bnl.key, trains=self.trains(i),
                moving_mean=_flat(layer.moving_mean), moving_variance=_flat(layer.moving_variance),
                mean=mean, variance=var,
                gamma=_flat(layer.gamma) if layer.scale else None,
                beta=_flat(layer.beta) if layer.center else None,
                epsilon=float(layer.epsilon),
            ))
        return Measurement(
            eval_train=eval_train, train_mode=train_mode, precise_bn=precise_bn,
            probe_size=probe.size, batch_size=self.batch_size, bn=bn,
            loss_standard_error=self.loss_standard_error,
        )


def _bytes_per_sample(probe):
    from keras import tree

    return sum(a[:1].nbytes for a in tree.flatten(probe.x) if a is not None) or 1


def _standard_error(moments):
    n, total, squares = (float(v) for v in moments) if moments is not None else (0, 0, 0)
    if n < 2:
        return None
    mean = total / n
    variance = max(squares / n - mean * mean, 0.0) * n / (n - 1)
    return (variance / n) ** 0.5


def _relax_batch_dim(tensor):
    if tensor is None:
        return None
    import tensorflow as tf

    tensor = tf.convert_to_tensor(tensor)
    if tensor.shape.rank == 0:
        return tensor
    return tf.raw_ops.PlaceholderWithDefault(input=tensor, shape=[None] + tensor.shape[1:])


def _flat(variable):
    return np.asarray(variable.numpy(), dtype=np.float64).reshape(-1)


def _to_floats(logs):
    return {name: float(np.asarray(value)) for name, value in logs.items()}


def measure(model, data, batch_size=32, *, probe_size=None, seed=0, inference_batch_size=None):
    """Measure one model state: ``eval_train``, ``train_mode`` and ``precise_bn``.

    What a custom training loop calls (no MLflow involved); the tracker calls
    the same code at each epoch end. See the module docstring for what each
    value is.

    Args:
        model: a compiled Keras model (Sequential, functional or subclassed).
        data: finite training data: ``(x, y)``, ``(x, y, sample_weight)``, a
            finite ``tf.data.Dataset`` of such batches, or a
            :class:`gaptrack.probe.Probe`.
        batch_size: the training batch size; the training-mode and PreciseBN
            measurements depend on it (batch statistics).
        probe_size: measure on at most this many samples (a seeded sample of
            larger data).
        seed: seed of the probe sample and of the Dropout masks.
        inference_batch_size: batch size of the inference passes.

    Returns:
        A :class:`Measurement`.

    Example:
        >>> m = gaptrack.measure(model, (x_train, y_train), batch_size=32)
        >>> m.eval_train["loss"], m.train_mode["loss"], m.precise_bn
        (0.3012, 0.3551, None)
    """
    probe = Probe.from_data(data, probe_size=probe_size, seed=seed)
    return Measurer(model, batch_size, seed=seed,
                    inference_batch_size=inference_batch_size).measure(probe)
