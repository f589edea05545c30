"""The probe: the fixed piece of training data every measurement runs on.

``evaluate()`` on the training data, the training-mode re-measurement and the
PreciseBN statistics all need the same samples, epoch after epoch, or their
differences would be sampling noise. A :class:`Probe` is those samples, held as
numpy arrays (referenced, not copied, when the whole of an in-memory training set
is the probe), with the number of samples the training data had.

Which samples:

- numpy data (``(x, y)`` or ``(x, y, sample_weight)``; ``x`` and ``y`` may be
  lists or dicts of arrays for multi-input/-output models): all of it when it has
  at most ``probe_size`` samples, otherwise a seeded sample of ``probe_size``
  rows without replacement, kept in their original order;
- a finite ``tf.data.Dataset`` of batches: all of it, or a seeded uniform sample
  (reservoir sampling, one pass, memory ``O(probe_size)``) when larger;
- a dataset of unknown cardinality: its first ``probe_size`` samples (reading
  on could never end);
- a ``keras.utils.PyDataset`` (indexable batches): all of it when it has at
  most ``probe_size`` samples, otherwise seeded batches, read in their order,
  up to ``probe_size`` samples;
- a dataset whose pipeline draws random numbers (augmentation in ``map()``):
  read as the others, with a :class:`ProbeWarning`, since the probe is then one
  frozen random draw, not the training data;
- an infinite dataset: an error, since no sample of it is the training set. Pass
  a finite one, e.g. ``dataset.take(n_batches)``, which is read once and kept,
  or one fixed draw of it, :meth:`Probe.from_pipeline` (what
  ``gaptrack.autolog()`` measures on when ``fit`` reads an infinite pipeline).
"""

import warnings

import numpy as np

from gaptrack.tfdata import independent_copy, random_ops

#: Samples measured by default. PreciseBN needs 10^3-10^4 samples for stable
#: population statistics; larger training sets are sampled down to this.
DEFAULT_PROBE_SIZE = 10_000


class ProbeError(ValueError):
    """The data cannot serve as a probe; the message says what would."""


class ProbeWarning(UserWarning):
    """The probe is not what ``fit`` trains on; the message says how to give one."""


def _tree():
    from keras import tree

    return tree


def _unpack(element):
    """``(x, y[, sample_weight])`` from a tuple, as Keras' ``fit`` reads it."""
    if isinstance(element, (tuple, list)) and 2 <= len(element) <= 3:
        x, y = element[0], element[1]
        sw = element[2] if len(element) == 3 else None
        if y is not None:
            return x, y, sw
    raise ProbeError(
        "probe data must be (x, y) or (x, y, sample_weight) with targets, "
        f"got {type(element).__name__}"
        + (f" of length {len(element)}" if isinstance(element, (tuple, list)) else "")
    )


def _num_samples(batch):
    """The number of samples (rows) of ``(x, y, sample_weight)``, the same for every array."""
    leaves = [a for a in _tree().flatten(batch) if a is not None]
    if not leaves:
        raise ProbeError("probe data has no arrays")
    sizes = {int(np.shape(a)[0]) for a in leaves}
    if len(sizes) != 1:
        shapes = ", ".join(f"{name} of shape {np.shape(a)}"
                           for name, part in zip(("x", "y", "sample_weight"), batch)
                           for a in _tree().flatten(part) if a is not None)
        raise ProbeError(f"probe arrays have different numbers of samples: {sorted(sizes)} "
                         f"({shapes}); each needs one row per sample"
                         + _labels_in_a_row(batch))
    return sizes.pop()


def _labels_in_a_row(batch):
    """What labels of shape ``(1, n)`` for ``n`` samples of ``x`` would do (the
    question's ``np.expand_dims(y, 0)``), or ''."""
    x_sizes = {int(np.shape(a)[0]) for a in _tree().flatten(batch[0]) if a is not None}
    n = x_sizes.pop() if len(x_sizes) == 1 else 0
    row = next((np.shape(a) for a in _tree().flatten(batch[1]) if a is not None
                and np.ndim(a) >= 2 and np.shape(a)[0] == 1 and np.size(a) == n > 1), None)
    if row is None:
        return ""
    return (f". y of shape {row} holds the {n} labels in one row, as np.expand_dims(y, 0) "
            f"makes it: against one output per sample, shape ({n}, 1), it would broadcast "
            f"into a {n} × {n} comparison, every output against every label (a model right "
            "on every sample would score p² + (1 - p)², p the share of ones). Accepted: y "
            f"of shape ({n},) or ({n}, 1), e.g. np.reshape(y, ({n}, 1))")


def _rows(structure, index):
    return _tree().map_structure(lambda a: None if a is None else a[index], structure)


def check_positive_int(name, value, error=ValueError):
    """``value`` as an ``int`` if it is a positive integer, else ``error`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Probe:
    """Fixed training samples to measure on.

    Args:
        x, y, sample_weight: numpy arrays (or nested lists/dicts of them).
        total: number of samples of the training data the probe was drawn from,
            or ``None`` when unknown.
        dataset_batch_size: the batch size of the ``tf.data.Dataset`` the probe
            was read from (its first batch), else ``None``.
        origin: how the probe was drawn, when it is one draw of a pipeline
            rather than (a sample of) the training data, else ``None``; the
            tracker tags the run with it and the report says it.

    Example:
        >>> probe = Probe.from_data((x_train, y_train), probe_size=2000, seed=0)
        >>> probe.size, probe.total
        (2000, 60000)
    """

    def __init__(self, x, y, sample_weight=None, total=None, dataset_batch_size=None,
                 origin=None):
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.size = _num_samples((x, y, sample_weight))
        if self.size == 0:
            raise ProbeError("probe data is empty (0 samples)")
        self.total = total
        self.dataset_batch_size = dataset_batch_size
        self.origin = origin

    @classmethod
    def from_data(cls, data, probe_size=None, seed=0):
        """Build a probe from training data (see the module docstring).

        Args:
            data: a :class:`Probe`, ``(x, y)``, ``(x, y, sample_weight)`` or a
                ``tf.data.Dataset`` of such batches.
            probe_size: at most this many samples (default
                :data:`DEFAULT_PROBE_SIZE`).
            seed: seed of the sample drawn from larger data.
        """
        if isinstance(data, Probe):
            return data
        probe_size = (DEFAULT_PROBE_SIZE if probe_size is None
                      else check_positive_int("probe_size", probe_size, ProbeError))
        if _is_tf_dataset(data):
            return cls._from_dataset(data, probe_size, seed)
        if _is_py_dataset(data):
            return cls._from_py_dataset(data, probe_size, seed)
        x, y, sw = _as_numpy(_unpack(data))
        total = _num_samples((x, y, sw))
        if total > probe_size:
            rng = np.random.default_rng(seed)
            index = np.sort(rng.choice(total, size=probe_size, replace=False))
            x, y, sw = _rows((x, y, sw), index)
        return cls(x, y, sw, total=total)

    @classmethod
    def _from_dataset(cls, dataset, probe_size, seed):
        import tensorflow as tf

        cardinality = int(dataset.cardinality())
        if cardinality == int(tf.data.INFINITE_CARDINALITY):
            raise ProbeError(
                "the training data is an infinite tf.data.Dataset (it repeats), so no "
                "probe can be drawn from it; pass a finite one explicitly, e.g. "
                "probe=dataset.take(64) (64 batches, read once and kept)"
            )
        unknown = cardinality == int(tf.data.UNKNOWN_CARDINALITY)
        randoms = random_ops(dataset)
        if randoms:
            warnings.warn(
                f"the probe dataset draws random numbers ({', '.join(randoms)}), e.g. "
                "augmentation in map(): gaptrack measures one frozen draw of it, which is "
                "neither the data evaluate() sees nor what fit() trains on. Pass the "
                "pipeline without its random ops as the probe, e.g. GapTracker("
                "tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size), ...)",
                ProbeWarning, stacklevel=3,
            )
        rng = np.random.default_rng(seed)
        reservoir, seen, first_batch = None, 0, None
        for element in dataset.as_numpy_iterator():
            x, y, sw = _unpack(element)
            batch = (x, y, sw)
            n = _num_samples(batch)
            if first_batch is None:
                first_batch = n
            if reservoir is None:
                reservoir = _tree().map_structure(
                    lambda a: None if a is None else np.empty((probe_size,) + a.shape[1:], a.dtype),
                    batch,
                )
            fill = min(n, max(probe_size - seen, 0))
            if fill:
                _assign(reservoir, np.arange(seen, seen + fill), _rows(batch, slice(0, fill)))
            if fill < n and not unknown:
                # Algorithm R, vectorised: sample i of the stream replaces slot
                # j ~ U{0..i} when j < probe_size; later samples win ties, as in
                # the sequential algorithm.
                stream_index = seen + np.arange(fill, n)
                slots = rng.integers(0, stream_index + 1)
                keep = slots < probe_size
                if keep.any():
                    _assign(reservoir, slots[keep], _rows(batch, np.arange(fill, n)[keep]))
            seen += n
            if unknown and seen >= probe_size:
                warnings.warn(
                    "the probe dataset has unknown cardinality; gaptrack measures on its "
                    f"first {probe_size} samples. Pass a finite dataset (e.g. "
                    "dataset.take(n)) to choose them.",
                    stacklevel=3,
                )
                break
        if reservoir is None:
            raise ProbeError("the probe dataset is empty (it yielded no batch)")
        size = min(seen, probe_size)
        x, y, sw = _rows(reservoir, slice(0, size))
        return cls(x, y, sw, total=None if unknown else seen, dataset_batch_size=first_batch)

    @classmethod
    def _from_py_dataset(cls, dataset, probe_size, seed):
        n = len(dataset)
        if not n:
            raise ProbeError("the probe PyDataset is empty (len 0)")
        first = _as_numpy(_unpack(dataset[0]))
        batch = _num_samples(first)
        wanted = min(n, -(-probe_size // batch))
        index = np.sort(np.random.default_rng(seed).choice(n, size=wanted, replace=False))
        batches = [first if i == 0 else _as_numpy(_unpack(dataset[int(i)])) for i in index]
        x, y, sw = _concatenate(batches, probe_size)
        total = sum(_num_samples(b) for b in batches) if wanted == n else None
        return cls(x, y, sw, total=total, dataset_batch_size=batch)

    @classmethod
    def from_pipeline(cls, dataset, steps=None, probe_size=None):
        """One fixed draw of an infinite ``tf.data`` pipeline of batches: what
        ``gaptrack.autolog()`` measures on when ``fit(dataset, steps_per_epoch=...)``
        reads one. A :class:`ProbeWarning` says what was drawn.

        The rule: the first whole batches of one pass of an independent copy of
        the pipeline (:func:`gaptrack.tfdata.independent_copy`: ``fit``'s
        reading, and any later pass, are left as they would have been), at most
        ``steps`` of them (one epoch of ``fit``) and at most ``probe_size``
        samples (default 10,000); at least one batch, cut to ``probe_size``
        samples if it alone is larger. Read once, kept as arrays: every epoch is
        measured on the same samples. With the pipeline's random ops seeded (an
        op's ``seed``, or a global seed: ``keras.utils.set_random_seed``), they
        are the batches ``fit``'s first epoch reads (when the pipeline was not
        iterated before ``fit``); without a seed, another draw of the same
        pipeline.

        Args:
            dataset: a ``tf.data.Dataset`` of ``(x, y[, sample_weight])`` batches.
            steps: ``fit``'s ``steps_per_epoch`` (``None``: no limit in batches).
            probe_size: at most this many samples (default 10,000).

        Raises:
            ProbeError: the pipeline cannot be copied without sharing state with
                ``fit``, or yields no batch.
        """
        probe_size = (DEFAULT_PROBE_SIZE if probe_size is None
                      else check_positive_int("probe_size", probe_size, ProbeError))
        copy, sampling = independent_copy(dataset)
        batches, seen = [], 0
        for element in copy.as_numpy_iterator():
            batch = _as_numpy(_unpack(element))
            n = _num_samples(batch)
            if batches and seen + n > probe_size:
                break
            batches.append(batch)
            seen += n
            if len(batches) == steps or seen >= probe_size:
                break
        if not batches:
            raise ProbeError("the pipeline is empty (it yielded no batch)")
        x, y, sw = _concatenate(batches, probe_size)
        size, first = min(seen, probe_size), _num_samples(batches[0])
        count = f"{len(batches)} batches" if len(batches) > 1 else "batch"
        origin = (f"one fixed draw of the training pipeline, its first {count} ({size} "
                  "samples), read once at train begin from a copy of it")
        if sampling:
            origin += f"; the pipeline samples at random ({', '.join(sampling)})"
        warnings.warn(
            f"fit() reads an infinite tf.data pipeline: gaptrack measures every epoch on {origin}"
            + (", so the probe is one draw of it, not the whole training data" if sampling
               else "") + ". fit()'s own reading is untouched. To measure on samples of your "
            "choosing, pass them: gaptrack.autolog(probe=(x, y)) or GapTracker((x, y), ...)",
            ProbeWarning, stacklevel=3)
        return cls(x, y, sw, dataset_batch_size=first, origin=origin)

    def with_class_weight(self, class_weight):
        """This probe weighted as ``fit(class_weight=class_weight)`` weights it: each
        sample's weight is its class's (1 for a class not named), as Keras derives it.

        Raises:
            ProbeError: ``class_weight`` is not a dict, the probe already has
                sample weights, or its labels are of several outputs (``fit``
                refuses class weights in these cases too).
        """
        if not isinstance(class_weight, dict):
            raise ProbeError("class_weight must be a dict {class index: weight}, as fit() "
                             f"takes it; got {class_weight!r}")
        if self.sample_weight is not None:
            raise ProbeError("class_weight and sample_weight cannot be used together "
                             "(fit() refuses it too); give one of them")
        if isinstance(self.y, (dict, list, tuple)):
            raise ProbeError("class_weight applies to a model with one output (as in fit()); "
                             "these labels are of several outputs")
        from gaptrack.keras_private import class_weight_to_sample_weights

        return Probe(self.x, self.y, class_weight_to_sample_weights(self.y, class_weight),
                     total=self.total, dataset_batch_size=self.dataset_batch_size,
                     origin=self.origin)

    def batches(self, batch_size):
        """Yield ``(x, y, sample_weight)`` slices of ``batch_size`` samples, in order."""
        for start in range(0, self.size, batch_size):
            yield _rows((self.x, self.y, self.sample_weight), slice(start, start + batch_size))


def _assign(target, index, source):
    for t, s in zip(_tree().flatten(target), _tree().flatten(source)):
        if t is not None:
            t[index] = s


def _concatenate(batches, limit):
    """``(x, y, sample_weight)`` of ``batches`` one after the other, at most ``limit`` rows."""
    return _rows(_tree().map_structure(lambda *a: None if a[0] is None else np.concatenate(a),
                                       *batches), slice(0, limit))


def _as_numpy(structure):
    return _tree().map_structure(
        lambda a: a if a is None or isinstance(a, np.ndarray) else np.asarray(a), structure)


def _is_py_dataset(data):
    import keras

    return isinstance(data, keras.utils.PyDataset)


def _is_tf_dataset(data):
    module = type(data).__module__
    if not module.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(data, tf.data.Dataset)
