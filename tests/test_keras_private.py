"""Keras' private API is reached from one module only, and what it reaches
behaves as the measurement relies on."""

import re
from pathlib import Path

import keras
import numpy as np

from builders import blobs, mlp
from gaptrack import keras_private

PACKAGE = Path(keras_private.__file__).parent


def test_no_other_module_touches_keras_private_api():
    """Keras' private API in keras_private.py only; TensorFlow's there and in
    tfdata.py (tf.data's graph serialisation, for copying a pipeline)."""
    keras_only = re.compile(r"keras\.src|\._(compile_loss|compile_metrics|symbolic_build|"
                            r"losses_override|loss_tracker|flatten_layers|seed_generators|moments"
                            r"|call_has_training_arg)")
    tensorflow = re.compile(r"tensorflow\.python")
    offenders = [f"{path.name}:{n}" for path in sorted(PACKAGE.glob("*.py"))
                 if path.name != "keras_private.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if keras_only.search(line) or (path.name != "tfdata.py" and tensorflow.search(line))]
    assert offenders == []


def test_fresh_metric_values_leave_the_running_metrics_alone():
    x, y = blobs(32)
    model = mlp()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = [np.array(v.numpy(), copy=True) for v in model.metrics_variables]
    fresh = keras_private.fresh_metric_values(model)
    assert any(b.any() for b in before)  # fit left counts in the metrics
    assert all(not np.asarray(f).any() for f in fresh)  # as after reset_metrics()
    after = [v.numpy() for v in model.metrics_variables]
    assert all((a == b).all() for a, b in zip(before, after))


def test_class_weights_and_validation_split_as_fit_takes_them():
    y = np.array([0, 1, 2, 1])
    np.testing.assert_array_equal(
        keras_private.class_weight_to_sample_weights(y, {0: 2.0, 1: 0.5}), [2.0, 0.5, 1.0, 0.5])
    x = np.arange(10)
    (train_x, train_y) = keras_private.train_validation_split((x, x * 2), 0.2)
    np.testing.assert_array_equal(train_x, x[:8])  # Keras keeps the first 80%
    np.testing.assert_array_equal(train_y, x[:8] * 2)


def test_unoptimized_calls_are_this_threads_and_end_with_the_block():
    """Grappler is off inside the block for this thread's calls only, and the
    call options are the very same object again after it (fit()'s keep theirs)."""
    import threading

    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    def meta_optimizer_off():
        config = config_pb2.ConfigProto()
        config.ParseFromString(context.context().function_call_options.config_proto_serialized)
        return config.graph_options.rewrite_options.disable_meta_optimizer

    before = context.context().function_call_options
    seen = {}
    with keras_private.unoptimized_tf_calls():
        seen["inside"] = meta_optimizer_off()
        other = threading.Thread(target=lambda: seen.update(other=meta_optimizer_off()))
        other.start()
        other.join()
    assert seen == {"inside": True, "other": False}
    assert context.context().function_call_options is before and not meta_optimizer_off()


class _NeedsValues(keras.Model):
    """A subclassed model whose call reads its input's values: it cannot be traced
    symbolically."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x) * float(keras.ops.convert_to_numpy(keras.ops.max(x)) > -1e9)


def test_output_shapes_are_traced_symbolically_and_with_values_where_they_must():
    """The labels check reads only the outputs' shapes: traced symbolically (no
    computation, nothing compiled), the same shapes as the eager inference call;
    a model that needs values is called with them."""
    x, _ = blobs(4)
    for model in (mlp(), _NeedsValues()):
        model(x)
        shapes = keras_private.output_shapes(model, x[:1])
        called = keras_private.inference_output(model, x[:1])
        assert tuple(shapes.shape) == tuple(called.shape) == (1, 3)
        assert isinstance(shapes, keras.KerasTensor) == isinstance(model, keras.Sequential)
