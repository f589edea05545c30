"""Tiny models and data shared by the tests."""

import keras
import numpy as np


def blobs(n=256, features=6, classes=3, seed=0):
    """Gaussian blobs: ``x`` float32 (n, features), ``y`` int64 class ids."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = (centers[y] + rng.normal(size=(n, features))).astype("float32")
    return x, y.astype("int64")


def mlp(features=6, classes=3, width=16, depth=2, bn=False, dropout=0.0, l2=0.0,
        activity=0.0, lr=1e-2, metrics=("accuracy",), momentum=0.99):
    """A small Sequential MLP, compiled."""
    layers = [keras.Input((features,))]
    for _ in range(depth):
        layers.append(keras.layers.Dense(
            width, activation="elu", kernel_initializer="he_normal",
            kernel_regularizer=keras.regularizers.l2(l2) if l2 else None,
            activity_regularizer=keras.regularizers.l1(activity) if activity else None,
        ))
        if bn:
            layers.append(keras.layers.BatchNormalization(momentum=momentum))
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                  metrics=list(metrics))
    return model


def all_state(model):
    """Copies of every variable a measurement must leave alone."""
    variables = list(model.variables) + list(model.metrics_variables)
    if model.optimizer is not None:
        variables += list(model.optimizer.variables)
    return [np.array(v.numpy(), copy=True) for v in variables]


class OwnStep(keras.Model):
    """The Keras guide's custom ``train_step`` (TensorFlow only: ``tf.GradientTape``):
    with ``compute_loss`` (a model compiled with a loss), or with a loss of its own,
    ``own_loss(y, y_pred)``, for a model compiled with an optimizer (and metrics)
    only. :class:`OwnLoss` is the latter on every backend."""

    def __init__(self, *args, own_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_loss = own_loss

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = (self.compute_loss(x=x, y=y, y_pred=y_pred) if self.own_loss is None
                    else self.own_loss(y, y_pred))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return self.get_metrics_result()


class OwnLoss(keras.Model):
    """A model whose ``fit()`` reports a loss of its own, ``mean(own_loss(y, y_pred))``,
    from an overridden ``compute_loss`` (as Keras documents it, on every backend),
    for a model compiled with an optimizer (and metrics) only: its compiled loss
    does not define the loss ``fit()`` reports."""

    def __init__(self, *args, own_loss, **kwargs):
        super().__init__(*args, **kwargs)
        self.own_loss = own_loss

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return keras.ops.mean(self.own_loss(y, y_pred))
