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

The exception, kept so that ``eval_train`` equals ``evaluate()``: where the
value Keras reports depends on how the data is cut into batches (a masked
per-timestep loss, ``reduction="sum"``, per-output losses of a multi-output
model; see :func:`_batching_matters`), the inference pass runs at
``evaluate()``'s default batch size, 32 (or ``inference_batch_size``).
"""

from dataclasses import dataclass, field

import numpy as np

from gaptrack import keras_private
from gaptrack import passes as compiled
from gaptrack.bn import BNStatistics, find_bn_layers
from gaptrack.distribute import bn_spread, replication
from gaptrack.keras3 import require_keras3
from gaptrack.labels import check_labels
from gaptrack.probe import Probe, check_positive_int
from gaptrack.weights import digest

#: Largest batch used for the inference passes.
MAX_INFERENCE_BATCH = 1024
#: Bytes of input per inference batch it aims for (keeps large images in memory).
_INFERENCE_BATCH_BYTES = 64 * 2**20
#: Most training batches run by one call of the training-mode pass.
MAX_TRAIN_CHUNK_BATCHES = 256
#: Bytes of input per call of the training-mode pass it aims for. Each call moves
#: the pass's state in and out of Python (a few ms); a larger chunk stays resident
#: once used: for the 20-layer MLP on Fashion-MNIST, 4 MB against 16 MB cost 11%
#: more time in the pass and 19 MB less memory after it (docs/performance.md).
_TRAIN_CHUNK_BYTES = 4 * 2**20
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
        bn_spread: under a strategy, how far the replicas' copies of the BN
            moving statistics are apart (:func:`gaptrack.distribute.bn_spread`),
            ``None`` when there are none to compare.
    """

    eval_train: dict
    train_mode: dict
    precise_bn: dict
    probe_size: int
    batch_size: int
    bn: list = field(default_factory=list)
    loss_standard_error: float = None
    bn_spread: float = None

    def __repr__(self):
        trains = sum(bool(s.trains) for s in self.bn)
        noise = self.loss_standard_error
        return (f"Measurement(probe_size={self.probe_size}, batch_size={self.batch_size}, "
                f"eval_train={_short(self.eval_train)}, train_mode={_short(self.train_mode)}, "
                f"precise_bn={_short(self.precise_bn)}, bn=<{len(self.bn)} BN layers, {trains} "
                f"training>, loss_standard_error={'None' if noise is None else f'{noise:.4g}'})")

    def _repr_html_(self):
        from gaptrack.render import html_table

        kinds = ("train_mode", "precise_bn", "eval_train")
        rows = [[name, *(_cell(getattr(self, kind), name) for kind in kinds)]
                for name in self.eval_train]
        trains = sum(bool(s.trains) for s in self.bn)
        return (f"<div><b>gaptrack.Measurement</b> on {self.probe_size} samples, training "
                f"batch size {self.batch_size}, {len(self.bn)} BN layers ({trains} training)"
                f"{html_table(['metric', *kinds], rows)}"
                "<small>gaptrack.explain(model, data, batch_size=..., history=...) "
                "decomposes the gap.</small></div>")

    @property
    def finite(self):
        """Whether every measured value is finite."""
        return all(np.isfinite(v) for values in (self.eval_train, self.train_mode,
                                                 self.precise_bn or {})
                   for v in values.values())


class Measurer:
    """The four measurements of one model, epoch after epoch.

    Under a ``tf.distribute`` strategy (the model built in its scope), the
    training-mode pass normalises each replica's shard of every batch as the
    replica did, ``eval_train`` is the model that ``get_weights()`` and
    ``save()`` hold (the first replica's BN moving statistics) and the spread
    of the replicas' copies is measured (:mod:`gaptrack.distribute`).

    Args:
        model: a compiled Keras model.
        batch_size: the training batch size (``fit``'s ``batch_size``; the
            global batch under a strategy).
        seed: seed of the Dropout masks in the training-mode pass; the same seed
            gives the same masks, so the value is reproducible.
        inference_batch_size: batch size of the inference passes; by default as
            large as fits in about 64 MB of input, at most 1024.
        loss: for a model compiled without a loss (its ``train_step`` computes
            one): that loss, as ``fn(y_true, y_pred)``, a ``keras.losses.Loss``
            or its name; measured as ``loss``. Without it such a model's compiled
            metrics only are measured.

    Example:
        >>> measurer = Measurer(model, batch_size=32)
        >>> measurer.measure(Probe.from_data((x, y))).eval_train
        {'loss': 0.41, 'accuracy': 0.87}
    """

    def __init__(self, model, batch_size, seed=0, inference_batch_size=None, loss=None):
        require_keras3(model, "gaptrack")
        backend = compiled.backend()
        if backend not in compiled.BACKENDS:
            raise MeasureError(
                f"Keras runs on the {backend!r} backend; gaptrack measures on "
                f"{', '.join(map(repr, compiled.BACKENDS))} (set KERAS_BACKEND)")
        if not getattr(model, "compiled", False):
            raise MeasureError(
                f"model {model.name!r} is not compiled; call model.compile(optimizer, "
                "loss, metrics) first: gaptrack measures the loss and metrics it compiles"
            )
        if keras_private.has_loss(model) and loss is not None:
            raise MeasureError(
                f"loss={loss!r} is for a model compiled without a loss; model {model.name!r} "
                "has one, which gaptrack measures: leave loss out"
            )
        if not (keras_private.has_loss(model) or loss is not None
                or keras_private.has_compiled_metrics(model)):
            raise MeasureError(
                f"model {model.name!r} was compiled without a loss or metrics, so there is "
                "nothing to measure: pass the loss its train_step computes (loss=fn(y_true, "
                "y_pred), a keras.losses.Loss or its name), or compile with metrics=..."
            )
        self.model = model
        self.loss = _as_loss(loss)
        self.batch_size = check_positive_int("batch_size", batch_size, MeasureError)
        if inference_batch_size is not None:
            inference_batch_size = check_positive_int("inference_batch_size",
                                                      inference_batch_size, MeasureError)
        self.inference_batch_size = inference_batch_size
        self.seed = seed
        self.bn_layers = find_bn_layers(model)
        #: Parts of a training batch that BN layers normalised separately
        #: (replicas under ``tf.distribute``; :class:`gaptrack.distribute.Replication`).
        self.shards = replication(model).shards
        #: Whether evaluate()'s value depends on its batching (:func:`_batching_matters`),
        #: for the layout it was found for.
        self._batching_matters = None
        self._layout = None

    def _compiled(self, probe):
        """The model's compiled passes (:func:`gaptrack.passes.compiled_passes`),
        traced again when its state layout changed."""
        keras_private.ensure_built(self.model, next(probe.batches(self.batch_size)))
        layout = (keras_private.compile_signature(self.model),
                  tuple(bn.layer.trainable for bn in self.bn_layers), self.loss)
        if layout != self._layout:
            self._layout = layout
            self._batching_matters = None
        check_labels(self.model, probe, self.loss)  # before any number: labels that broadcast
        return compiled.compiled_passes(self.model, self.bn_layers, self.batch_size, layout,
                                        self.shards, self.loss)

    def _seed_values(self, passes):
        rng = np.random.default_rng(self.seed)
        variables = self.model.non_trainable_variables
        return [np.asarray(rng.integers(0, 2**31 - 1, size=variables[i].shape),
                           dtype=variables[i].dtype) for i in passes.seed_index]

    def _inference_batch(self, probe):
        if self.inference_batch_size:
            return self.inference_batch_size
        if self._batching_matters is None:
            self._batching_matters = _batching_matters(self.model, probe, self.loss)
        if self._batching_matters:
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
            ``(metrics, population, trains)``: ``{name: value}``; per BN layer
            (in :attr:`bn_layers` order) ``(mean, variance)`` numpy arrays, or
            ``None`` for a layer not called on the forward path; and per BN layer
            whether it used batch statistics.
        """
        from keras import ops

        passes = self._compiled(probe)
        metric_values = keras_private.fresh_metric_values(self.model)
        seeds = [ops.convert_to_tensor(s) for s in self._seed_values(passes)]
        sums = passes.empty_sums()
        chunk = self._train_chunk_size(probe) if passes.chunk_batches else self.batch_size
        with passes.random_state(self.seed):
            for x, y, sw in probe.batches(chunk):
                metric_values, seeds, sums = passes.train((x, y, sw), metric_values, seeds, sums)
        population = passes.population(sums)
        trains = [passes.trains.get(id(bn.layer), False) for bn in self.bn_layers]
        return self._floats(passes.logs(metric_values)), population, trains

    def inference_pass(self, probe, population=None):
        """``(eval_train, precise_bn, loss_standard_error)``.

        ``precise_bn`` is ``None`` unless ``population`` (``{bn index: (mean,
        variance)}``) is given. ``loss_standard_error`` is the standard error of
        the mean per-sample loss on the probe (``None`` where per-sample losses
        are not defined), the sampling noise of ``eval_train["loss"]``."""
        from keras import ops

        passes = self._compiled(probe)
        eval_values = keras_private.fresh_metric_values(self.model)
        pbn_values = eval_values if population else None
        if population:
            variables = self.model.non_trainable_variables
            population = {
                i: tuple(ops.convert_to_tensor(s, dtype=variables[j].dtype)
                         for s, j in zip(stats, idx))
                for i, stats in population.items()
                for idx in [passes.bn_index[i]]
            }
        else:
            population = None
        dtype = compiled.moments_dtype()
        moments = tuple(ops.convert_to_tensor(0.0, dtype) for _ in range(3))
        for x, y, sw in probe.batches(self._inference_batch(probe)):
            eval_values, pbn_values, moments = passes.infer(
                (x, y, sw), eval_values, pbn_values, population, moments)
        return (self._floats(passes.logs(eval_values)),
                self._floats(passes.logs(pbn_values)) if population else None,
                _standard_error(moments))

    def _floats(self, logs):
        """The measured values of ``logs`` as floats."""
        return {name: float(np.asarray(value))
                for name, value in keras_private.measured_logs(self.model, logs, self.loss).items()}

    def measure(self, probe, weights=None):
        """All four measurements of the model's current state on ``probe``.

        ``weights`` is the :class:`gaptrack.weights.WeightDigest` of that state
        when the caller has read it (the tracker does, for its fingerprint);
        otherwise it is read here when needed (whether the weights are finite)."""
        passes = self._compiled(probe)
        if passes.unoptimized and not (weights or digest(self.model)).finite:
            with passes.as_evaluate():
                return self._measure(probe)
        measurement = self._measure(probe)
        if passes.unoptimized and not measurement.finite:
            # NaN/inf: which class an argmax picks among NaNs, whether a ReLU
            # passes a NaN, depend on the kernels: measured again with the fused
            # kernels fit() and evaluate() run
            with passes.as_evaluate():
                return self._measure(probe)
        return measurement

    def _measure(self, probe):
        train_mode, population, trains = self.train_mode_pass(probe)
        recalibrate = {i: stats for i, stats in enumerate(population)
                       if stats is not None and trains[i]}
        eval_train, precise_bn, noise = self.inference_pass(probe, recalibrate)
        bn = []
        for i, bnl in enumerate(self.bn_layers):
            layer = bnl.layer
            mean, var = population[i] if population[i] is not None else (None, None)
            if mean is None:
                mean = var = np.full(int(np.prod(layer.moving_mean.shape)), np.nan)
            bn.append(BNStatistics(
                path=bnl.path, key=bnl.key, trains=trains[i],
                moving_mean=_flat(layer.moving_mean), moving_variance=_flat(layer.moving_variance),
                mean=mean, variance=var,
                gamma=_flat(layer.gamma) if layer.scale else None,
                beta=_flat(layer.beta) if layer.center else None,
                epsilon=float(layer.epsilon),
            ))
        return Measurement(
            eval_train=eval_train, train_mode=train_mode, precise_bn=precise_bn,
            probe_size=probe.size, batch_size=self.batch_size, bn=bn,
            loss_standard_error=noise, bn_spread=bn_spread(self.model, self.bn_layers),
        )


def _short(values, most=12):
    """``{name: value}`` in 4 significant digits, at most ``most`` names."""
    if values is None:
        return "None"
    items = [f"{name!r}: {value:.4g}" for name, value in list(values.items())[:most]]
    more = [f"... {len(values) - most} more"] if len(values) > most else []
    return "{" + ", ".join(items + more) + "}"


def _cell(values, name):
    return "-" if values is None or name not in values else f"{values[name]:.4g}"


def _batching_matters(model, probe, loss=None):
    """Whether ``evaluate()``'s loss depends on how the probe is cut into batches.

    Keras averages each batch's loss, weighted by the batch's size. That is the
    mean over samples, whatever the batching, when a batch's loss is the sum of
    its per-sample losses over the batch size (``sum_over_batch_size``, sample
    weights included). It is not:

    - when the output carries a mask (``Embedding(mask_zero=True)`` or
      ``Masking`` on the path to a per-timestep head): a batch's loss is
      divided by *that batch's* unmasked count;
    - with ``reduction="sum"`` (a batch's sum), or ``"mean_with_sample_weight"``
      with sample weights (divided by that batch's sum of weights);
    - for per-output losses of a multi-output model (``<output>_loss``), which
      Keras averages over batches without weighting by batch size.

    Then the inference pass runs at ``evaluate()``'s default batch size, 32.
    ``loss`` is the one given for a model compiled without a loss, if any.
    """
    if keras_private.has_per_output_losses(model):
        return True
    reductions = keras_private.loss_reductions(model) | {getattr(loss, "reduction", None)}
    if "sum" in reductions or (probe.sample_weight is not None
                               and "mean_with_sample_weight" in reductions):
        return True
    x, _, _ = next(probe.batches(1))
    return keras_private.output_has_mask(model, x)


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


def _flat(variable):
    return np.asarray(variable.numpy(), dtype=np.float64).reshape(-1)


def _as_loss(loss):
    """``loss`` as a ``keras.losses.Loss`` (``None`` stays ``None``)."""
    import keras

    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    if callable(loss):
        return keras_private.function_loss(loss)
    raise MeasureError(f"loss must be a function fn(y_true, y_pred), a keras.losses.Loss or a "
                       f"loss name, got {loss!r}")


def measure(model, data, batch_size=32, *, probe_size=None, seed=0, inference_batch_size=None,
            loss=None):
    """Measure one model state: ``eval_train``, ``train_mode`` and ``precise_bn``.

    What a custom training loop calls (no MLflow involved); the tracker calls
    the same code at each epoch end. See the module docstring for what each
    value is. The first call on a model traces its passes; they are kept with
    the model (:mod:`gaptrack.passes`), so later calls do not trace again.

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
        loss: the loss of a model compiled without one (see :class:`Measurer`).

    Returns:
        A :class:`Measurement`.

    Example:
        >>> m = gaptrack.measure(model, (x_train, y_train), batch_size=32)
        >>> m.eval_train["loss"], m.train_mode["loss"], m.precise_bn
        (0.3012, 0.3551, None)
    """
    require_keras3(model, "gaptrack.measure()")
    probe = Probe.from_data(data, probe_size=probe_size, seed=seed)
    return Measurer(model, batch_size, seed=seed, inference_batch_size=inference_batch_size,
                    loss=loss).measure(probe)
