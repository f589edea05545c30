"""gaptrack measures Keras 3 models: a Keras 2 (``tf_keras``) model is refused at once.

A model of another Keras (``tf_keras``, what ``tf.keras`` is with
``TF_USE_LEGACY_KERAS=1``; ``keras`` 2 itself under TensorFlow <= 2.15) has none of the stateless API gaptrack measures with. Given to gaptrack it
would fail deep inside Keras (``'GapTracker' object has no attribute
'_implements_train_batch_hooks'``, or "not compiled" for a compiled model);
:func:`require_keras3` turns that into one error saying what the model is and
what is accepted, called first by every entry point that takes a model.
"""


class Keras2ModelError(TypeError):
    """The model is a Keras 2 (``tf_keras``) model; gaptrack measures Keras 3 models."""


def require_keras3(model, where):
    """Refuse a Keras 2 model.

    Args:
        model: what was given as the model.
        where: the gaptrack entry point, for the message (``"gaptrack.measure()"``).

    Raises:
        Keras2ModelError: ``model`` is a ``tf_keras`` / Keras 2 model.

    Example:
        >>> require_keras3(model, "gaptrack.explain()")
    """
    import keras

    if isinstance(model, keras.Model) or not _is_keras2(model):
        return
    raise Keras2ModelError(
        f"{where} was given {type(model).__name__} {getattr(model, 'name', '')!r}, a tf_keras "
        f"(Keras 2) model, what tf.keras is with TF_USE_LEGACY_KERAS=1; gaptrack measures "
        f"Keras 3 models (keras>=3, here "
        f"{keras.__version__}). To switch: unset TF_USE_LEGACY_KERAS and build the model "
        "with `import keras` (keras.Sequential, keras.layers, ...) instead of tf.keras or "
        "tf_keras"
    )


def _is_keras2(model):
    """Whether ``model`` is a ``tf_keras`` model, read from its class hierarchy
    (without importing ``tf_keras``)."""
    return any(cls.__module__.split(".")[0] == "tf_keras" for cls in type(model).__mro__)
