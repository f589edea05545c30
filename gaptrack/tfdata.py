"""What gaptrack reads of a ``tf.data`` pipeline's graph: its random ops, and a
copy of it that reads on its own.

TensorFlow-private APIs (``Dataset._as_serialized_graph``, the ``GraphDef`` of
a pipeline, ``DatasetFromGraph``) are touched here only, so that a TensorFlow
upgrade breaks one place.

**Why a copy.** Iterating a ``tf.data.Dataset`` twice does not share an
iterator, but it shares the pipeline's state: ``shuffle()`` (reshuffling each
pass, its default) draws each pass's order from a seed generator the dataset
owns, so a pass read before ``fit()`` moves ``fit``'s order on by one pass, and
so does every later pass (a later ``evaluate(dataset.take(10))`` too). The same
holds for ``Dataset.random(rerandomize_each_iteration=True)`` and a ``cache()``
in memory. :func:`independent_copy` rebuilds the pipeline from its serialised
graph with those states made anew from the same seeds: the copy's first pass is
the pass a freshly built pipeline makes, and the original's passes are the ones
they would have been. Variables and lookup tables a ``map()`` reads are
serialised by value, so the copy has its own. What cannot be made anew (an
iterator or another resource a ``map()`` reads from, shared with ``fit``), or a
pipeline TensorFlow cannot serialise (one whose in-memory data pass protobuf's
2 GB limit), is a :class:`gaptrack.probe.ProbeError`.

**What it costs.** The serialised graph holds the pipeline's in-memory tensors
(``from_tensor_slices`` data), so building the copy copies them once, in memory
and time (see ``docs/how-to/infinite-datasets.md`` for the numbers); the copy is
dropped once the probe is read.
"""

#: Ops whose input at this index is a seed generator of their own (per-pass seeds).
_SEED_GENERATOR_INPUT = {"ShuffleDatasetV3": 4, "ShuffleAndRepeatDatasetV2": 5,
                         "RandomDatasetV2": 2}
#: Ops whose input at this index is an in-memory cache of their own.
_CACHE_INPUT = {"CacheDatasetV2": 2}
#: Ops that sample at random without a random-number op: they choose which
#: samples the first batches hold.
_SAMPLING_OPS = ("ShuffleDataset", "ShuffleAndRepeatDataset", "RandomDataset")


def _graph(dataset, policy=None):
    import tensorflow as tf

    options = {} if policy is None else {"external_state_policy": policy}
    serialized = dataset._as_serialized_graph(**options)
    return tf.compat.v1.GraphDef.FromString(serialized.numpy())


def random_ops(dataset):
    """The random-number ops of a ``tf.data`` pipeline (in its graph and the
    functions of its ``map()``/``filter()``...), sorted: ``RandomUniform`` of
    ``tf.image.random_*``, ``RandomStandardNormal`` of ``tf.random.normal``, the
    ``StatelessRandom*`` of Keras' random layers, ``RngReadAndSkip`` of a
    ``tf.random.Generator``, ``RandomDataset`` of ``sample_from_datasets``.
    ``shuffle()`` reorders without them."""
    return sorted(_random(_ops(_graph(dataset))))


def _ops(graph):
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def _random(ops):
    return {op for op in ops if "Random" in op or op.startswith("Rng")}


def independent_copy(dataset):
    """A copy of ``dataset`` whose passes leave the original's untouched (see the
    module docstring), and the ops that make its first batches a random draw
    (its random ops and ``shuffle()``s, sorted).

    Returns:
        ``(copy, sampling_ops)``.

    Raises:
        gaptrack.probe.ProbeError: the pipeline cannot be copied so (the message
            says why).
    """
    import tensorflow as tf
    from tensorflow.python.data.ops import dataset_ops

    from gaptrack.probe import ProbeError

    try:
        graph = _graph(dataset, tf.data.experimental.ExternalStatePolicy.IGNORE)
    except Exception as exc:  # noqa: BLE001 - whatever stops TensorFlow serialising it
        raise ProbeError("the pipeline cannot be copied: TensorFlow cannot serialise it ("
                         f"{str(exc).splitlines()[0][:200]})") from None
    remade = {}
    for node in graph.node:
        for table, op in ((_SEED_GENERATOR_INPUT, "DummySeedGenerator"),
                          (_CACHE_INPUT, "DummyMemoryCache")):
            index = table.get(node.op)
            if index is not None and index < len(node.input):
                remade[node.input[index].split(":")[0]] = op
    resource = tf.resource.as_datatype_enum
    for node in graph.node:
        if node.op != "Const" or node.attr["dtype"].type != resource:
            continue
        if node.name not in remade:
            readers = sorted({n.op for n in graph.node if node.name in
                              (i.split(":")[0] for i in n.input)})
            raise ProbeError(
                "the pipeline cannot be copied without sharing state with fit(): "
                f"{', '.join(readers)} reads a resource (e.g. an iterator a map() draws "
                "from) that a copy would advance for fit() too")
        node.op = remade[node.name]  # made anew, from the seeds of the op it feeds
        node.ClearField("attr")
    ops = _ops(graph)
    sampling = sorted(_random(ops) | {op for op in ops if op.startswith(_SAMPLING_OPS)})
    serialized = graph.SerializeToString()
    del graph  # the pipeline's in-memory data: one copy at a time
    variant = tf.raw_ops.DatasetFromGraph(graph_def=serialized)
    return dataset_ops._VariantDataset(variant, dataset.element_spec), sampling
