"""What the tracker asks of a model's weights each measured epoch, answered on the device
from a fixed sample of each variable: the cost grows with the number of variables, not
with the number of parameters.

Two questions, both answered by one small reduction run where the weights live
(a GPU's or TPU's memory; the host's on a CPU), so that per measured epoch 8
bytes a variable cross to the host, never the weights themselves:

- **Are they the weights of epoch N?** (:attr:`WeightDigest.fingerprint`) Per
  variable, the sum of the bit patterns, read as integers and wrapping, of its
  *sampled* values: all of them for a variable of at most :data:`SAMPLE` values
  (biases, normalisation parameters), else :data:`SAMPLE` values evenly spaced
  through it (one in ``ceil(size / SAMPLE)``). Integer addition is exact and
  associative, so the same weights give the same fingerprint in whatever order
  the device adds; weights that changed at any sampled value give another (with
  probability 1 - 2**-32 a variable). An optimizer step changes nearly every
  value of the variables it trains, so weights of two epochs differ at the
  sampled ones too. That is how the tracker tells the weights ``fit()`` returns
  (``EarlyStopping(restore_best_weights=True)`` put back an earlier epoch's)
  from the last measured epoch's. Like Keras' ``EarlyStopping``, which keeps a
  reference to the best weights and never hashes them, it does not read every
  weight: at most ``SAMPLE`` values a variable, 16 KB of float32 (5.6 MB for
  ConvNeXtBase's 344 variables, against 350 MB of weights). What it cannot see:
  weights that differ from the last measured epoch's only between the sampled
  values of every variable that differs (an ``Embedding`` whose few updated rows
  all fall between the sampled ones).
- **Are the sampled values finite?** (:attr:`WeightDigest.finite`) The float32
  sum of each variable's sampled values: a NaN or an infinity among them makes
  it non-finite whatever the order of the additions (so does a sum that
  overflows, for weights near 1e38). Training that diverges turns whole
  variables non-finite, so the sample sees it. The measured losses are the
  other half (:meth:`gaptrack.measurement.Measurer.measure`): if a pass's
  values are not finite, the probe is measured again with the kernels
  ``evaluate()`` runs, whatever the sample said.

The reduction is compiled once per model and variable list, the backend's way
(a ``tf.function``, ``jax.jit``; PyTorch runs it eagerly), as the passes are
(:mod:`gaptrack.passes`).
"""

import math
import weakref
from dataclasses import dataclass

import numpy as np

#: The values read of each variable: all of a smaller one, this many evenly
#: spaced of a larger one.
SAMPLE = 4096
#: ``{model: (ids of the variables, compiled reduction)}``; an entry goes with its model.
_CACHE = weakref.WeakKeyDictionary()
#: The integer type to read each floating type's bits as.
_BITS = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


@dataclass(frozen=True)
class WeightDigest:
    """What one reading of a sample of a model's weights (``model.weights``) says.

    Attributes:
        finite: whether every sampled floating value is finite.
        fingerprint: the per-variable integer sums of the sampled values'
            bits, as bytes; equal for equal weights.
    """

    finite: bool
    fingerprint: bytes


def sampled_indices(size):
    """The flat indices of a variable of ``size`` values that the digest reads:
    ``range(0, size, stride)`` with ``stride = ceil(size / SAMPLE)``."""
    return np.arange(0, size, _stride(size))


def _stride(size):
    return max(1, math.ceil(size / SAMPLE))


def digest(model):
    """The :class:`WeightDigest` of ``model``'s current weights."""
    from keras import ops

    variables = model.weights
    if not variables:
        return WeightDigest(finite=True, fingerprint=b"")
    ids, reduce = _CACHE.get(model, (None, None))
    if ids != [id(v) for v in variables]:
        ids, reduce = [id(v) for v in variables], _compiled(_reduction(variables), variables)
        _CACHE[model] = (ids, reduce)
    bits, sums = (ops.convert_to_numpy(a) for a in reduce())
    return WeightDigest(finite=bool(np.isfinite(sums).all()), fingerprint=bits.tobytes())


def _reduction(variables):
    """The function of the variables' values: ``(bit sums, float sums)`` of
    their samples, one element a variable (the float sum 0 for a variable that
    is not floating)."""
    from keras import backend, ops

    bit_types = [_BITS.get(backend.standardize_dtype(v.dtype)) for v in variables]
    sizes = [int(np.prod(v.shape)) for v in variables]

    def sample(value, size):  # a strided slice reads the sampled values only
        flat = ops.reshape(value, (-1,))
        return flat if _stride(size) == 1 else flat[::_stride(size)]

    def reduce(values):
        samples = [sample(value, size) for value, size in zip(values, sizes)]
        bits = [ops.cast(ops.sum(ops.view(s, bit_type) if bit_type
                                 else ops.cast(s, "int32")), "int32")
                for s, bit_type in zip(samples, bit_types)]
        sums = [ops.sum(ops.cast(s, "float32")) if bit_type else ops.zeros((), "float32")
                for s, bit_type in zip(samples, bit_types)]
        return ops.stack(bits), ops.stack(sums)

    return reduce


def _compiled(reduce, variables):
    """``reduce`` of the variables' current values, compiled the way the backend
    compiles the passes, as a function of no argument."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # the variables read inside the graph: no eager read a variable per call
        return tf.function(lambda: reduce([v.value for v in variables]), autograph=False)
    if backend == "jax":
        import jax

        jitted = jax.jit(reduce)
        return lambda: jitted([v.value for v in variables])
    import torch  # the third backend gaptrack measures on (gaptrack.passes.BACKENDS)

    no_grad = torch.no_grad()(reduce)
    return lambda: no_grad([v.value for v in variables])
