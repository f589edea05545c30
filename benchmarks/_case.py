"""The benchmarks' reference case: the 20-layer MLP with BatchNormalization after
each Dense (``projects/deep_mlp.py``, ``bn=1``, 100 units) on Fashion-MNIST's
training images (Debian's ``dataset-fashion-mnist``). The repository's root must be
on ``sys.path`` (for ``projects``)."""


def data(samples):
    """The first ``samples`` training images, as the project's scenarios load them."""
    from projects.training import load

    return load({"dataset": "fashion_mnist", "seed": 0, "samples": samples})


def model(data, depth=20):
    """A fresh compiled model, seeded: the same weights at every call."""
    import keras

    from projects import deep_mlp

    keras.utils.set_random_seed(0)
    return deep_mlp.model({"depth": depth, "units": 100, "bn": 1, "learning_rate": 1e-3}, data)
