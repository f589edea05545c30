"""What the tracker asks of a model's weights each measured epoch, answered on the device.

Two questions, both answered by one small reduction run where the weights live
(a GPU's or TPU's memory; the host's on a CPU), so that per measured epoch about
12 bytes a variable cross to the host, never the weights themselves:

- **Are they all finite?** (:attr:`WeightDigest.finite`) The sum of each
  floating variable, in float32: a NaN or an infinity anywhere makes it
  non-finite whatever the order of the additions. A sum that overflows (weights
  near 1e38) says "not finite" too; then the passes run with the kernels
  ``evaluate()`` runs (:meth:`gaptrack.measurement.Measurer.measure`), which
  measure the same values.
- **Are they the weights of epoch N?** (:attr:`WeightDigest.fingerprint`) The
  sum of each variable's bit patterns read as integers, wrapping. Integer
  addition is exact and associative, so the same weights give the same
  fingerprint in whatever order the device adds (a float sum does not: a GPU's
  reduction order may vary between calls); weights that changed give another
  with probability 1 - 2**-32 for each variable. That is how the tracker tells
  the weights ``fit()`` returns (``EarlyStopping(restore_best_weights=True)``
  put back an earlier epoch's) from the last measured epoch's: where Keras'
  ``EarlyStopping`` keeps a copy of the best weights, the tracker keeps 4
  bytes a variable per measured epoch and reads the weights on the host never.

The reduction is compiled once per model and variable list, the backend's way
(a ``tf.function``, ``jax.jit``; PyTorch runs it eagerly), as the passes are
(:mod:`gaptrack.passes`).
"""

import weakref
from dataclasses import dataclass

import numpy as np

#: ``{model: (ids of the variables, compiled reduction)}``; an entry goes with its model.
_CACHE = weakref.WeakKeyDictionary()
#: The integer type to read each floating type's bits as.
_BITS = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


@dataclass(frozen=True)
class WeightDigest:
    """What one reading of a model's weights (``model.weights``) says.

    Attributes:
        finite: whether every floating weight is finite.
        fingerprint: the per-variable integer sums of the weights' bits, as
            bytes; equal for equal weights.
    """

    finite: bool
    fingerprint: bytes


def digest(model):
    """The :class:`WeightDigest` of ``model``'s current weights."""
    from keras import ops

    variables = model.weights
    if not variables:
        return WeightDigest(finite=True, fingerprint=b"")
    ids, reduce = _CACHE.get(model, (None, None))
    if ids != [id(v) for v in variables]:
        ids, reduce = [id(v) for v in variables], _compiled(_reduction(variables))
        _CACHE[model] = (ids, reduce)
    bits, sums = (ops.convert_to_numpy(a) for a in reduce([v.value for v in variables]))
    return WeightDigest(finite=bool(np.isfinite(sums).all()), fingerprint=bits.tobytes())


def _reduction(variables):
    """The function of the variables' values: ``(bit sums, float sums)``, one
    element a variable (the float sum 0 for a variable that is not floating)."""
    from keras import backend, ops

    bit_types = [_BITS.get(backend.standardize_dtype(v.dtype)) for v in variables]

    def reduce(values):
        bits = [ops.cast(ops.sum(ops.view(value, bit_type) if bit_type
                                 else ops.cast(value, "int32")), "int32")
                for value, bit_type in zip(values, bit_types)]
        sums = [ops.sum(ops.cast(value, "float32")) if bit_type else ops.zeros((), "float32")
                for value, bit_type in zip(values, bit_types)]
        return ops.stack(bits), ops.stack(sums)

    return reduce


def _compiled(function):
    """``function`` compiled the way the backend compiles the passes."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, autograph=False)
    if backend == "jax":
        import jax

        return jax.jit(function)
    import torch  # the third backend gaptrack measures on (gaptrack.passes.BACKENDS)

    return torch.no_grad()(function)
