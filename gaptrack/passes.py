"""The two compiled passes over the probe, compiled the backend's way.

- The **training-mode pass** runs the probe in batches of the training batch
  size with ``training=True`` (Dropout masks from fixed seeds, BN with batch
  statistics), accumulating the compiled metrics and each BN layer's input
  moments (the PreciseBN sums).
- The **inference step** runs one batch with ``training=False`` twice: with the
  model's BN moving statistics (``eval_train``) and, when given, with population
  statistics in their place (``precise_bn``); it also accumulates the moments of
  the per-sample loss (its standard error).

Nothing here changes the model: every call is ``stateless_call`` on values
(:mod:`gaptrack.keras_private`), with the weights passed in as arguments.

How each backend runs them (:func:`runner`), as its own trainer runs
``fit()``/``evaluate()`` steps:

- **TensorFlow**: ``tf.function`` graphs (no AutoGraph, as Keras' own step
  functions). The training-mode pass runs many training batches per call in a
  ``tf.while_loop``, batch after batch exactly as separate calls would: the
  Python round trip of a call cost more than the forward of a small batch. The
  inference step traces the forward once and calls it twice (with the moving
  and with the population statistics). One trace serves every batch size, the
  last partial batch included: the batch dimension is unknown when traced, as
  in ``fit()``.
- **JAX**: ``jax.jit``, traced once per shape: the training-mode pass runs the
  whole batches of a chunk in one ``lax.scan`` (one trace per number of batches in
  a chunk) and a last partial batch on its own; the inference step once per batch
  shape, as Keras' JAX trainer does. Under ``keras.distribution`` the weights keep
  their layouts.
- **PyTorch**: eager, one batch per call, under ``torch.no_grad()``.

Tracing costs more than a pass over a 6,000-sample probe, so each function is
traced once: the passes of a model are kept (:func:`compiled_passes`) for as
long as the model lives and its state layout stays the same, shared by every
:class:`gaptrack.measurement.Measurer`, hence by ``measure()``, ``GapTracker``
and ``recalibrate_bn``.
"""

import contextlib
import weakref

import numpy as np

from gaptrack import keras_private
from gaptrack.bn import watch_inputs

#: ``{model: (layout signature, {training batch size: CompiledPasses})}``; an
#: entry goes with its model (the passes hold it weakly).
_CACHE = weakref.WeakKeyDictionary()


def backend():
    """The Keras backend in use: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    import keras

    return keras.backend.backend()


def compiled_passes(model, bn_layers, batch_size, layout, shards=1, loss=None):
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
        by_batch_size[batch_size] = CompiledPasses(model, bn_layers, batch_size, shards, loss)
    return by_batch_size[batch_size]


class CompiledPasses:
    """The compiled passes for one model state layout and training batch size.

    Built by :func:`compiled_passes`.

    Args:
        model: a built, compiled Keras model (held weakly).
        bn_layers: its :class:`gaptrack.bn.BNLayer` list.
        batch_size: the training batch size (the global batch under a strategy).
        shards: replicas that each normalised their own shard of a training
            batch (:func:`gaptrack.bn.watch_inputs`); 1 when BN saw the whole batch.
        loss: the loss of a model compiled without one (see
            :func:`gaptrack.keras_private.stateless_forward`), or ``None``.

    Attributes:
        chunk_batches: whether :meth:`train` takes many training batches per call
            (TensorFlow) or one.
        traces: ``{"train": n, "infer": n}``, times each pass was traced
            (``None`` on PyTorch, which does not trace).
    """

    def __init__(self, model, bn_layers, batch_size, shards=1, loss=None):
        self._model = weakref.ref(model)
        self.bn_layers = bn_layers
        self.batch_size = batch_size
        self.shards = shards
        self.loss = loss
        self.seed_index = keras_private.seed_indices(model)
        position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        self.bn_index = [(position[id(bn.layer.moving_mean)], position[id(bn.layer.moving_variance)])
                         for bn in bn_layers]
        #: channels of each BN layer, in the packed PreciseBN sums (:meth:`empty_sums`)
        self.bn_sizes = [int(np.prod(bn.layer.moving_mean.shape)) for bn in bn_layers]
        #: the layer (index) of each channel of the packed sums
        self._channel_layer = np.repeat(np.arange(len(bn_layers)), self.bn_sizes).astype("int32")
        #: ``{id(layer): whether it used batch statistics}``, read while tracing.
        self.trains = {}
        self._traces = {"train": 0, "infer": 0}
        self._runner = _RUNNERS[backend()](self)
        self.chunk_batches = self._runner.chunk_batches

    @property
    def model(self):
        """The model (a weak reference: the passes do not keep it alive)."""
        return self._model()

    @property
    def traces(self):
        return dict(self._traces) if self._runner.traces else None

    def train(self, data, metric_values, seeds, sums):
        """The training-mode pass over ``data`` (``(x, y, sample_weight)``; whole
        training batches, the last may be partial; one batch unless
        :attr:`chunk_batches`). ``sums`` are the PreciseBN sums so far
        (:meth:`empty_sums`). Returns ``(metric_values, seeds, sums)``."""
        return self._runner.train(data, metric_values, seeds, sums)

    def empty_sums(self):
        """The PreciseBN sums before the first batch, packed into three tensors
        (few tensors in and out of each call, few ops a batch): per BN layer the
        samples it saw, and for all layers' channels one after another the sums of
        the batch means and variances, each weighted by its batch's samples."""
        from keras import ops

        total = sum(self.bn_sizes)
        return (ops.zeros([len(self.bn_sizes)], "float32"), ops.zeros([total], "float32"),
                ops.zeros([total], "float32"))

    def population(self, sums):
        """Per BN layer, ``(mean, variance)`` numpy arrays of the population the
        pass saw (the weighted means of the batch moments), or ``None`` for a layer
        that saw no sample."""
        from keras import ops

        counts, mean_sum, var_sum = (ops.convert_to_numpy(a) for a in sums)
        bounds = np.cumsum(self.bn_sizes)[:-1]
        return [(mean / float(count), var / float(count)) if count else None
                for count, mean, var in zip(counts, np.split(mean_sum, bounds),
                                            np.split(var_sum, bounds))]

    def infer(self, data, eval_values, pbn_values, population, moments):
        """The inference step on one batch. Returns ``(eval_values, pbn_values,
        moments)``."""
        return self._runner.infer(data, eval_values, pbn_values, population, moments)

    @property
    def unoptimized(self):
        """Whether the passes run without the graph optimiser that ``evaluate()``
        runs with (TensorFlow, full precision: see
        :func:`gaptrack.keras_private.unoptimized_tf_calls`)."""
        return self._runner.unoptimized

    def as_evaluate(self):
        """A context in which the passes run with the graph optimiser, as
        ``evaluate()`` does."""
        return self._runner.as_evaluate()

    def random_state(self, seed):
        """A context in which the training-mode pass draws its Dropout masks from
        ``seed``. The seed generators' states are passed in as values, except
        on PyTorch, where a layer without a seed of its own draws from torch's
        global generator: there it is seeded inside the context and restored
        after it."""
        return self._runner.random_state(seed)

    def logs(self, metric_values):
        """The logs (``{name: value}``) of the metric state ``metric_values``."""
        return keras_private.metrics_result(self.model, metric_values)

    def _train_step(self, trainable, non_trainable, x, y, sw, metric_values, seeds, sums):
        model = self.model
        non_trainable = list(non_trainable)
        for i, seed in zip(self.seed_index, seeds):
            non_trainable[i] = seed
        with watch_inputs(self.bn_layers, self.shards) as record:
            new_nt, metric_values, _, _ = keras_private.stateless_forward(
                model, trainable, non_trainable, x, y, sw, metric_values, training=True,
                loss=self.loss)
        return metric_values, [new_nt[i] for i in self.seed_index], self._add_moments(sums, record)

    def _add_moments(self, sums, record):
        """``sums`` plus one batch's moments of each BN layer (:meth:`empty_sums`),
        in a few ops for all layers together."""
        from keras import ops

        if not self.bn_layers:
            return sums
        counts, means, variances = [], [], []
        for bn, size in zip(self.bn_layers, self.bn_sizes):
            if id(bn.layer) not in record:  # the layer is not on this forward path
                self.trains[id(bn.layer)] = False
                counts.append(ops.zeros((), "float32"))
                means.append(ops.zeros([size], "float32"))
                variances.append(ops.zeros([size], "float32"))
                continue
            trains, mean, var, n = record[id(bn.layer)]
            self.trains[id(bn.layer)] = trains
            counts.append(n)
            means.append(mean)
            variances.append(var)
        counts = ops.stack(counts)
        weights = ops.take(counts, self._channel_layer)
        count_sum, mean_sum, var_sum = sums
        return (count_sum + counts, mean_sum + ops.concatenate(means) * weights,
                var_sum + ops.concatenate(variances) * weights)

    def _infer_step(self, forward, trainable, non_trainable, x, y, sw, eval_values, pbn_values,
                    population, moments):
        eval_values, new_moments = forward(trainable, list(non_trainable), x, y, sw, eval_values,
                                           moments)
        if population is None:
            return eval_values, None, new_moments
        non_trainable = list(non_trainable)
        for i, (mean, var) in population.items():
            i_mean, i_var = self.bn_index[i]
            non_trainable[i_mean] = mean
            non_trainable[i_var] = var
        # the same signature as above, so that a traced forward serves both calls
        pbn_values, _ = forward(trainable, non_trainable, x, y, sw, pbn_values, moments)
        return eval_values, pbn_values, new_moments

    def _infer_forward(self, trainable, non_trainable, x, y, sw, metric_values, moments):
        """Inference forward, metrics and loss moments of one batch. The moments
        are taken here, beside the loss, not from a returned ``y_pred``: Keras'
        crossentropy of a softmax output reads the logits off the softmax op,
        which a traced function's output no longer shows."""
        _, metric_values, _, y_pred = keras_private.stateless_forward(
            self.model, trainable, non_trainable, x, y, sw, metric_values, training=False,
            loss=self.loss)
        return metric_values, self._loss_moments(moments, y, y_pred, sw)

    def _loss_moments(self, moments, y, y_pred, sw):
        """Running ``(n, sum l, sum l^2)`` of the per-sample compiled loss ``l``.

        Only for a single output with one compiled loss (the per-sample values
        of several weighted outputs are not defined by Keras); else ``None``.
        A loss returning one value a batch leaves the moments as they are.
        """
        from keras import ops, tree

        loss_fn = keras_private.single_loss_function(self.model)
        if moments is None or loss_fn is None or tree.is_nested(y_pred) or tree.is_nested(y):
            return None
        dtype = moments[0].dtype
        values = ops.cast(loss_fn.call(y, y_pred), dtype)
        if len(values.shape) == 0:  # a loss that averages the batch itself: no per-sample
            return moments          # values, so no noise estimate (n stays 0)
        if len(values.shape) > 1:
            values = ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=1)
        if sw is not None:
            values = values * ops.reshape(ops.cast(sw, dtype), (-1,))
        n, total, squares = moments
        return (n + ops.cast(ops.shape(values)[0], dtype), total + ops.sum(values),
                squares + ops.sum(values * values))


def moments_dtype():
    """The dtype of the loss moments: float64, but float32 on JAX, which has no
    float64 unless ``jax_enable_x64`` is set."""
    if backend() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


class _Runner:
    chunk_batches = False
    traces = True
    unoptimized = False

    def as_evaluate(self):
        return contextlib.nullcontext()

    def random_state(self, seed):
        return contextlib.nullcontext()


class _TensorFlow(_Runner):
    chunk_batches = True

    def __init__(self, passes):
        self.passes = passes
        self.unoptimized = keras_private.full_precision(passes.model)
        #: ``{unoptimized: (training-mode pass, inference step)}``: a function is
        #: optimised (or not) once, at its first call, so each way has its own.
        self._functions = {}

    def _pair(self):
        import tensorflow as tf

        if self.unoptimized not in self._functions:
            # No AutoGraph, as Keras' own step functions (``do_not_convert``): the
            # loop is an explicit tf.while_loop, and converting Keras' code took
            # half the tracing time.
            self._functions[self.unoptimized] = (
                tf.function(self._train_chunk, reduce_retracing=True, autograph=False),
                tf.function(self._infer_step, reduce_retracing=True, autograph=False),
                # Traced once, called twice by each inference step: the second
                # forward (population statistics) costs no second trace.
                tf.function(self.passes._infer_forward, autograph=False))
        return self._functions[self.unoptimized]

    def train(self, data, *state):
        return self._call(self._pair()[0], data, *state)

    def infer(self, data, *state):
        return self._call(self._pair()[1], data, *state)

    def _call(self, function, data, *state):
        """``function(*data, *state)`` through the trace of ``function`` whose
        ``data`` (``x, y, sample_weight``) have an unknown batch dimension: as in
        ``fit()`` (Keras' per-output loss trackers weight batches only when it is
        known), and one trace serves every batch and chunk size. Full-precision
        models run without Grappler (:func:`gaptrack.keras_private.unoptimized_tf_calls`)."""
        import tensorflow as tf
        from keras import tree

        specs = tree.map_structure(
            lambda a: None if a is None else tf.TensorSpec((None,) + tuple(a.shape[1:]),
                                                           tf.as_dtype(a.dtype)), data)
        concrete = function.get_concrete_function(*specs, *state)
        with (keras_private.unoptimized_tf_calls() if self.unoptimized
              else contextlib.nullcontext()):
            return concrete(*data, *state)

    @contextlib.contextmanager
    def as_evaluate(self):
        unoptimized, self.unoptimized = self.unoptimized, False
        try:
            yield
        finally:
            self.unoptimized = unoptimized

    def _train_chunk(self, x, y, sw, metric_values, seeds, sums):
        """The training-mode step over the consecutive training batches of one
        chunk (whole batches; the last chunk may end with a partial one)."""
        import tensorflow as tf
        from keras import tree

        passes = self.passes
        passes._traces["train"] += 1
        model, b = passes.model, passes.batch_size
        n = tf.shape(next(a for a in tree.flatten(x) if a is not None))[0]

        def body(i, metric_values, seeds, sums):
            batch = tree.map_structure(
                lambda a: None if a is None else a[i * b:(i + 1) * b], (x, y, sw))
            non_trainable = [v.value for v in model.non_trainable_variables]
            metric_values, seeds, sums = passes._train_step(
                model.trainable_variables, non_trainable, *batch, metric_values, seeds, sums)
            return i + 1, metric_values, seeds, sums

        _, metric_values, seeds, sums = tf.while_loop(
            lambda i, *_: i * b < n, body, (tf.constant(0), metric_values, seeds, sums))
        return metric_values, seeds, sums

    def _infer_step(self, x, y, sw, eval_values, pbn_values, population, moments):
        import tensorflow as tf

        passes = self.passes
        passes._traces["infer"] += 1
        trainable, non_trainable = _values(passes.model)
        # Read into tensors: the second forward gets tensors (the population
        # statistics) where the first would get tf.Variables, and a nested
        # tf.function traces again for a variable where a tensor was.
        non_trainable = [tf.convert_to_tensor(v) for v in non_trainable]
        return passes._infer_step(self._pair()[2], trainable, non_trainable,
                                  x, y, sw, eval_values, pbn_values, population, moments)


class _Jax(_Runner):
    chunk_batches = True

    def __init__(self, passes):
        import jax

        self.passes = passes
        self._scan = jax.jit(self._scan_steps)
        self._train = jax.jit(self._train_step)
        self._infer = jax.jit(self._infer_step)

    def _scan_steps(self, trainable, non_trainable, batches, metric_values, seeds, sums):
        """The training-mode step over ``batches`` (whole training batches stacked
        on a leading axis), batch after batch in a ``lax.scan``: one call for
        them all, as the TensorFlow pass's graph loop."""
        from jax import lax

        self.passes._traces["train"] += 1

        def body(carry, batch):
            return self.passes._train_step(trainable, non_trainable, *batch, *carry), None

        carry, _ = lax.scan(body, (metric_values, seeds, sums), batches)
        return carry

    def _train_step(self, *args):
        self.passes._traces["train"] += 1
        return self.passes._train_step(*args)

    def _infer_step(self, *args):
        self.passes._traces["infer"] += 1
        return self.passes._infer_step(self.passes._infer_forward, *args)

    def train(self, data, metric_values, seeds, sums):
        from keras import tree

        b = self.passes.batch_size
        n = _num_samples(data)
        whole = n // b
        state = (metric_values, seeds, sums)
        values = _values(self.passes.model)
        if whole:
            batches = tree.map_structure(
                lambda a: None if a is None else a[:whole * b].reshape((whole, b) + a.shape[1:]),
                data)
            state = self._scan(*values, _tensors(batches), *state)
        if n % b:
            rest = tree.map_structure(lambda a: None if a is None else a[whole * b:], data)
            state = self._train(*values, *_tensors(rest), *state)
        return tuple(state)

    def infer(self, data, *state):
        return self._infer(*_values(self.passes.model), *_tensors(data), *state)


class _Torch(_Runner):
    traces = False

    def __init__(self, passes):
        self.passes = passes

    @contextlib.contextmanager
    def random_state(self, seed):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    def train(self, data, *state):
        import torch

        with torch.no_grad():
            return self.passes._train_step(*_values(self.passes.model), *_tensors(data), *state)

    def infer(self, data, *state):
        import torch

        passes = self.passes
        with torch.no_grad():
            return passes._infer_step(passes._infer_forward, *_values(passes.model),
                                      *_tensors(data), *state)


_RUNNERS = {"tensorflow": _TensorFlow, "jax": _Jax, "torch": _Torch}
#: The Keras backends gaptrack measures on.
BACKENDS = tuple(_RUNNERS)


def _values(model):
    """The model's trainable and non-trainable values, as arguments."""
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def _num_samples(data):
    from keras import tree

    return next(a for a in tree.flatten(data) if a is not None).shape[0]


def _tensors(data):
    from keras import ops, tree

    return tree.map_structure(lambda a: None if a is None else ops.convert_to_tensor(a), data)
