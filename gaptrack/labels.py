"""Labels whose shape broadcasts against the model's output: refused before measuring.

Keras' losses and metrics compare labels and outputs element by element, after
one alignment: when their ranks differ by one and the longer shape ends in 1,
that axis is squeezed (or a rank-1 shape gets a trailing 1), so labels of shape
``(n,)`` and outputs of shape ``(n, 1)`` compare the ``n`` pairs they should
(Keras' ``squeeze_or_expand_to_same_rank``). Beyond that, numpy
broadcasting applies, silently. Labels of shape ``(n, 2)`` against outputs of
shape ``(n, 1)`` compare ``2n`` pairs: ``mean_squared_error`` and
``BinaryAccuracy`` return a number, ``fit()`` and ``evaluate()`` agree on it,
and it is not the model's loss or accuracy. (``binary_crossentropy`` refuses
those shapes; ``mse`` and the accuracies do not.)

So before any number is measured, each output's labels are checked: labels
whose shape, aligned as Keras aligns it, broadcasts against the output's into a
comparison *larger than the output* are refused with one :class:`LabelShapeError`
naming both shapes and those accepted. Accepted for an output of shape
``(n, ..., k)``: the output's own shape; ``(n, ...)`` when ``k`` is 1; class
indices ``(n, ...)`` or ``(n, ..., 1)`` for a sparse loss, which never compare
more pairs than the output has. Shapes that do not broadcast at all are left to
Keras, which refuses them itself.

The user's own metric call of the question this project was built from,
``BinaryAccuracy().update_state(np.expand_dims(y, 0), model.predict(x))``, puts
the ``n`` labels in one row, ``(1, n)``: gaptrack never gets there, since such
labels do not have one row per sample (:mod:`gaptrack.probe` refuses them with
their own message). A loss of the user's own (a function or ``Loss`` class not
from Keras) may read its labels any way it likes, e.g. ``(n, 2)`` holding a
label and a weight: then the labels are not checked.
"""

import weakref

import numpy as np

from gaptrack import keras_private
from gaptrack.probe import ProbeError


#: ``{model: (weak reference to the probe, loss, loss signature)}`` of the last
#: labels found fine: the tracker checks before its run starts and the Measurer
#: before it measures, and the second finds the first's answer here.
_CHECKED = weakref.WeakKeyDictionary()


class LabelShapeError(ProbeError):
    """Labels would be compared with the model's outputs in more pairs than there
    are outputs; the message names both shapes and those accepted."""


def aligned(label_shape, output_shape):
    """The two shapes as Keras' losses and metrics align them before comparing:
    a rank differing by one with a trailing 1 loses it (or a rank-1 shape gains one)."""
    labels, outputs = tuple(label_shape), tuple(output_shape)
    if len(labels) == len(outputs) + 1 and labels[-1] == 1:
        return (labels, outputs + (1,)) if len(outputs) == 1 else (labels[:-1], outputs)
    if len(outputs) == len(labels) + 1 and outputs[-1] == 1:
        return (labels + (1,), outputs) if len(labels) == 1 else (labels, outputs[:-1])
    return labels, outputs


def accepted(output_shape):
    """The label shapes accepted for an output of ``output_shape``."""
    output_shape = tuple(output_shape)
    if len(output_shape) < 2:
        return [output_shape]
    if output_shape[-1] == 1:
        return [output_shape, output_shape[:-1]]
    return [output_shape, output_shape[:-1], output_shape[:-1] + (1,)]


def comparison(label_shape, output_shape):
    """The shape of the comparison Keras makes, when it is larger than the output
    (``None`` when it is not, or when the shapes do not broadcast)."""
    label_shape, output_shape = tuple(label_shape), tuple(output_shape)
    if label_shape in accepted(output_shape):
        return None
    try:
        shape = np.broadcast_shapes(*aligned(label_shape, output_shape))
    except ValueError:
        return None  # Keras refuses these itself
    return shape if int(np.prod(shape)) > int(np.prod(output_shape)) else None


def check_labels(model, probe, loss=None):
    """Raise :class:`LabelShapeError` when the probe's labels broadcast against
    the model's outputs into a larger comparison (see the module docstring).

    Args:
        model: the compiled Keras model. One not built yet is not checked here
            (building it would build its optimizer, outside a distribution
            strategy's scope when called from a custom loop's tracker): the
            :class:`gaptrack.measurement.Measurer` builds it, then checks.
        probe: the :class:`gaptrack.probe.Probe`.
        loss: the loss given for a model compiled without one, if any.
    """
    if not model.built or _own_loss(model, loss):
        return
    signature = keras_private.loss_signature(model)
    checked, checked_loss, checked_signature = _CHECKED.get(model, (None, None, None))
    if checked is not None and checked() is probe and checked_loss is loss \
            and checked_signature == signature:
        return
    x, _, _ = next(probe.batches(1))
    for name, labels, output in _pairs(model, probe.y, keras_private.output_shapes(model, x)):
        label_shape = tuple(np.shape(labels))
        output_shape = (probe.size,) + tuple(output.shape[1:])
        shape = comparison(label_shape, output_shape)
        if shape is None:
            continue
        where = f"output {name!r}" if name is not None else "the model's output"
        reshape = (f" (np.reshape(labels, {output_shape}) if they hold one label per output)"
                   if np.prod(label_shape) == np.prod(output_shape) else "")
        raise LabelShapeError(
            f"labels of shape {label_shape} against {where}, of shape {output_shape}, "
            f"broadcast into a {' × '.join(map(str, shape))} comparison: "
            f"{int(np.prod(shape))} label-output pairs for {int(np.prod(output_shape))} "
            "outputs, so the loss and metrics would average pairs that do not belong "
            "together (and fit() and evaluate() would agree on them). Accepted labels for "
            f"this output: {' or '.join(map(str, accepted(output_shape)))}{reshape}"
        )
    _CHECKED[model] = (weakref.ref(probe), loss, signature)


def _own_loss(model, loss):
    """Whether a loss not from Keras reads the labels (it may read them as it likes)."""
    from keras import tree

    losses = [leaf for leaf in tree.flatten(getattr(model, "loss", None)) if leaf is not None]
    losses += [] if loss is None else [loss]
    return any(not isinstance(leaf, str)
               and not getattr(getattr(leaf, "fn", leaf), "__module__", "").startswith("keras.")
               for leaf in losses)


def _pairs(model, labels, outputs):
    """``(output name or None, labels, output)`` as Keras pairs them: labels in a
    dict by output name, otherwise in order."""
    from keras import tree

    if not tree.is_nested(outputs):
        return [(None, labels, outputs)] if not tree.is_nested(labels) else []
    if isinstance(outputs, dict):
        named = outputs
    else:
        flat = tree.flatten(outputs)
        names = list(getattr(model, "output_names", None) or [])
        named = dict(zip(names if len(names) == len(flat) else range(len(flat)), flat))
    if isinstance(labels, dict):
        pairs = [(k, v, named[k]) for k, v in labels.items() if k in named and v is not None]
    else:
        flat_labels = tree.flatten(labels)
        if len(flat_labels) != len(named):
            return []  # Keras names the mismatch itself
        pairs = [(k, v, o) for (k, o), v in zip(named.items(), flat_labels) if v is not None]
    # nested outputs ({"head": {"cls": ..., "reg": ...}}): their leaves, named by path
    leaves = []
    for name, head_labels, output in pairs:
        if tree.is_nested(output):
            leaves += [(f"{name}/{inner}", v, o) for inner, v, o in _pairs(model, head_labels, output)]
        else:
            leaves.append((name, head_labels, output))
    return leaves
