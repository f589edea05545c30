"""Every use of Keras' private API, in one module, so that a Keras upgrade breaks
one place.

gaptrack measures a model the way ``fit()`` and ``evaluate()`` do, without
changing any of its state. Keras 3 has the public pieces (``stateless_call``,
``stateless_compute_loss``, ``compute_metrics``) but not the glue its own
trainers use around them: the loss tracker, the ``add_loss`` override of a
stateless call, the per-output loss trackers, the seed generators' state, a BN
layer's batch moments. Those are reached here and nowhere else, as is the one
piece of TensorFlow's private API gaptrack uses (:func:`unoptimized_tf_calls`).
"""

import contextlib

import numpy as np


def compiled_loss(model):
    """The model's compiled loss object, or ``None`` when compiled without one."""
    return model._compile_loss


def has_loss(model):
    """Whether ``fit()`` reports a loss for ``model``: a compiled loss or ``model.losses``."""
    return model._compile_loss is not None or bool(model.losses)


def ensure_built(model, batch):
    """Build the model and its compiled loss and metrics on ``batch`` if needed
    (as ``fit()`` does on its first batch)."""
    unbuilt = not model.built or (
        model._compile_metrics is not None and not model._compile_metrics.built
    ) or (model._compile_loss is not None and not model._compile_loss.built)
    if unbuilt:
        model._symbolic_build(data_batch=batch)


def compile_signature(model):
    """What the compiled passes depend on besides the BN layers' flags: a change
    (recompiled, new optimizer, new variables) means they must be traced again."""
    return (id(model._compile_metrics), id(model._compile_loss), id(model.optimizer),
            len(model.non_trainable_variables), len(model.metrics_variables))


def loss_signature(model):
    """What the labels check depends on besides the outputs: the compiled loss
    (a new one after ``compile()``). Stable from ``compile()`` to the end of ``fit``,
    unlike :func:`compile_signature`, which the first train step's metrics change."""
    return id(model._compile_loss)


def seed_indices(model):
    """Indices, in ``model.non_trainable_variables``, of the seed generators'
    states (Dropout's among them)."""
    index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    return [index[id(sg.state)]
            for layer in model._flatten_layers(include_self=True)
            for sg in getattr(layer, "_seed_generators", [])
            if id(sg.state) in index]


def full_precision(model):
    """Whether every layer of ``model`` computes in float32 or float64 (no
    ``mixed_float16``/``mixed_bfloat16`` policy)."""
    return all(layer.dtype_policy.compute_dtype in ("float32", "float64")
               for layer in model._flatten_layers(include_self=True))


def child_layers(layer):
    """The direct sub-layers of ``layer``, in order."""
    if hasattr(layer, "layers"):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def fresh_metric_values(model):
    """Values of ``model.metrics_variables`` as after ``reset_metrics()``,
    without resetting the model's own metrics (a running ``fit()`` holds them)."""
    from keras.src.backend import StatelessScope

    variables = model.metrics_variables
    with StatelessScope(state_mapping=[(v, v.value) for v in variables]) as scope:
        model.reset_metrics()
    return [scope.get_current_value(v) for v in variables]


def stateless_forward(model, trainable, non_trainable, x, y, sw, metric_values, training,
                      loss=None):
    """One batch: forward pass, loss and metric update, all stateless, on the
    values ``trainable`` and ``non_trainable`` of the model's variables.

    Mirrors Keras' ``train_step``/``test_step`` (and JAX's stateless trainer):
    ``model.losses`` of the call are added through the trainer's override, the
    loss tracker is weighted by the batch size, ``compute_metrics`` updates the
    compiled metrics. A model compiled without a loss (:func:`has_loss` false)
    gets ``loss(y, y_pred, sample_weight)`` in its place, or none.

    Returns:
        ``(new non-trainable values, new metric values, logs, y_pred)``.
    """
    from keras import ops, tree
    from keras.src.backend import StatelessScope

    kwargs = {"training": training} if model._call_has_training_arg else {}
    y_pred, new_non_trainable, losses = model.stateless_call(
        trainable, non_trainable, x, return_losses=True, **kwargs
    )
    if not has_loss(model):
        loss = None if loss is None else loss(y, y_pred, sample_weight=sw)
    else:
        if losses:
            model._losses_override.clear()
            model._losses_override = losses
        try:
            loss, (_, _, metric_values) = model.stateless_compute_loss(
                trainable, new_non_trainable, metric_values,
                x=x, y=y, y_pred=y_pred, sample_weight=sw, training=training,
            )
        finally:
            if losses:
                model._losses_override.clear()
    mapping = list(zip(model.metrics_variables, metric_values))
    with StatelessScope(state_mapping=mapping) as scope:
        if model._loss_tracker is not None and loss is not None:
            n = ops.shape(next(a for a in tree.flatten(x) if a is not None))[0]
            model._loss_tracker.update_state(loss, sample_weight=n)
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sw)
    metric_values = [scope.get_current_value(v) for v in model.metrics_variables]
    return new_non_trainable, metric_values, logs, y_pred


def metrics_result(model, metric_values):
    """The logs (``{name: value}``) of the metric state ``metric_values``."""
    from keras.src.backend import StatelessScope

    with StatelessScope(state_mapping=list(zip(model.metrics_variables, metric_values))):
        return model.get_metrics_result()


def function_loss(fn):
    """``fn(y_true, y_pred)`` as a ``keras.losses.Loss`` (sample weights, masks and
    the ``sum_over_batch_size`` reduction as for a function given to ``compile``)."""
    from keras.src.losses.losses import LossFunctionWrapper

    return LossFunctionWrapper(fn)


def measured_logs(model, logs, loss):
    """The part of ``logs`` that a model compiled without a loss had measured:
    its compiled metrics, and ``"loss"`` when ``loss`` was given, as far as its
    ``metrics`` list them (a ``metrics`` property of its own replaces them with
    trackers its ``train_step`` feeds, which stay at their reset values here).
    ``logs`` as it is for other models."""
    if has_loss(model):
        return logs
    listed = {id(m) for m in model.metrics}
    names = (set(model._compile_metrics.result())
             if has_compiled_metrics(model) and id(model._compile_metrics) in listed else set())
    if loss is not None and id(model._loss_tracker) in listed:
        names.add("loss")
    return {name: value for name, value in logs.items() if name in names}


def metric_names(model, loss):
    """The names of what gaptrack measures for a built model (the keys of
    ``evaluate(return_dict=True)``), read from its metric objects without
    running it."""
    return list(measured_logs(model, model.get_metrics_result(), loss))


def functional_class():
    """The class of ``keras.Model(inputs, outputs)`` (Keras' ``Functional``)."""
    from keras.src.models.functional import Functional

    return Functional


def single_loss_function(model):
    """The one compiled per-sample loss function of a single-output model
    (its ``call(y_true, y_pred)`` gives per-sample values), else ``None``."""
    flat = getattr(model._compile_loss, "_flat_losses", None) or []
    if len(flat) != 1 or not hasattr(flat[0][1], "call"):
        return None
    return flat[0][1]


def has_compiled_metrics(model):
    """Whether the model was compiled with ``metrics=`` (or ``weighted_metrics=``)."""
    return model._compile_metrics is not None


def has_per_output_losses(model):
    """Whether Keras reports per-output losses (``<output>_loss``), which it
    averages over batches without weighting by batch size."""
    compile_loss = model._compile_loss
    return compile_loss is not None and bool(compile_loss.metrics)


def loss_reductions(model):
    """The ``reduction`` of each compiled loss (``"sum_over_batch_size"``, ``"sum"``,
    ``"mean_with_sample_weight"``...), as a set."""
    flat = getattr(model._compile_loss, "_flat_losses", None) or []
    return {getattr(entry[1], "reduction", None) for entry in flat}


def inference_output(model, x):
    """The model's output on ``x`` in inference mode, from one stateless call
    (no variable changes)."""
    kwargs = {"training": False} if model._call_has_training_arg else {}
    y_pred, _ = model.stateless_call([v.value for v in model.trainable_variables],
                                     [v.value for v in model.non_trainable_variables], x, **kwargs)
    return y_pred


def output_shapes(model, x):
    """The model's inference outputs for inputs shaped as ``x``, traced
    symbolically (``compute_output_spec``: nothing computed, compiled or kept);
    the eager :func:`inference_output` where symbolic tracing fails (a subclassed
    model's ``call`` that needs values). Leaves have ``.shape``; Keras masks are
    not traced symbolically, see :func:`output_has_mask`."""
    import keras
    from keras import tree

    kwargs = {"training": False} if model._call_has_training_arg else {}
    try:
        symbolic = tree.map_structure(
            lambda a: keras.KerasTensor(np.shape(a),
                                        dtype=keras.backend.standardize_dtype(a.dtype)), x)
        return model.compute_output_spec(symbolic, **kwargs)
    except Exception:  # noqa: BLE001 - any failure of the symbolic trace: trace with values
        return inference_output(model, x)


def output_has_mask(model, x):
    """Whether the model's output carries a Keras mask (``Embedding(mask_zero=True)``,
    ``Masking``... on the output path), read from one stateless inference call on ``x``."""
    from keras import tree
    from keras.src.backend.common.masking import get_keras_mask

    return any(get_keras_mask(t) is not None for t in tree.flatten(inference_output(model, x)))


def batch_moments(layer, x, mask):
    """A BN layer's per-channel mean and variance of ``x``, exactly as the layer
    takes them in training (biased variance, masked samples left out)."""
    return layer._moments(x, mask)


@contextlib.contextmanager
def moments_taken(layer):
    """Inside the block, the ``(mean, variance)`` a BN ``layer`` takes of its
    batch when a call normalises with batch statistics is appended to the
    yielded list (nothing when it uses its moving statistics)."""
    taken = []

    def moments(x, mask, _moments=layer._moments):
        mean_variance = _moments(x, mask)
        taken.append(mean_variance)
        return mean_variance

    layer._moments = moments
    try:
        yield taken
    finally:
        # Removes the instance attribute, so the class's ``_moments`` is back.
        object.__delattr__(layer, "_moments")


def class_weight_to_sample_weights(y, class_weight):
    """Per-sample weights as ``fit(class_weight=...)`` derives them."""
    from keras.src.trainers.data_adapters.data_adapter_utils import (
        class_weight_to_sample_weights as convert,
    )

    return np.asarray(convert(y, class_weight))


def train_validation_split(arrays, validation_split):
    """The training part of ``arrays`` as ``fit(validation_split=...)`` takes it."""
    from keras.src.trainers.data_adapters.array_slicing import train_validation_split as split

    return split(arrays, validation_split=validation_split)[0]


@contextlib.contextmanager
def unoptimized_tf_calls():
    """Inside the block, a ``tf.function`` of this thread that runs for the first
    time is instantiated without Grappler (TensorFlow's graph optimiser).

    Grappler optimises a function once, at its first call, and took 1.1 of the
    2.1 CPU-seconds of gaptrack's first measurement of the 20-layer MLP, more
    than it saves on every later pass (these passes ran 7 % slower without it:
    0.45 s instead of 0.42 s over 6,000 samples). The call options are the
    eager context's per-thread ones, so the model's own ``fit()``/``evaluate()``
    functions, and other threads, keep theirs. Only for full-precision models
    (:func:`full_precision`): in float16 Grappler's fused ops round otherwise
    (1e-4 relative), and ``eval_train`` is to equal ``evaluate()``.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    before = ctx.function_call_options
    config = config_pb2.ConfigProto()
    config.ParseFromString(before.config_proto_serialized)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    ctx.function_call_options = context.FunctionCallOptions(
        executor_type=before.executor_type, config_proto=config)
    try:
        yield
    finally:
        ctx.function_call_options = before
