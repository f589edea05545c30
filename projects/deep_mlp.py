"""deep_mlp: the CIFAR-10 notebook's 20-layer MLP, with or without BatchNormalization.

Reproduces the case in gaptrack's SPEC: a 20-layer MLP with BN trained on
CIFAR-10 (Geron, *Hands-On Machine Learning*, chapter 11, exercise 8), where
``fit()`` said 0.386 training accuracy and ``evaluate()`` on the same training
data 0.330. Each of the 21 BN layers keeps moving averages that follow by 1% per
step; with a large batch (few steps per epoch) and a tiny learning rate they stay
far from the statistics the layers see, and ``evaluate()``, which uses them, looks
much worse than ``fit()``: the ``gap/<m>/bn_ema`` part. Without BN the gap is
drift only (and small, the model moving little per epoch).

Model, as in the notebook: Flatten -> ``depth`` x Dense(``units``, ELU, He normal)
-> Dense(softmax); with ``bn=1``: Flatten -> BN -> ``depth`` x (Dense(``units``,
He normal) -> BN -> ELU) -> Dense(softmax). Nadam(``learning_rate``), sparse
categorical cross-entropy, accuracy. The project's ``main`` entry point runs it
with and without BN at batch sizes 32 and 1024.
"""

from projects.params import common, flag, integer

PARAMS = {
    **common(dataset="digits", samples="all", epochs=10, batch_size=32, learning_rate=1e-5,
             validation_split=0.1),
    "depth": integer(20, minimum=1),
    "units": integer(100, minimum=1),
    "bn": flag(0),
}


def model(config, data):
    import keras

    layers = [keras.Input(data.x.shape[1:]), keras.layers.Flatten()]
    if config["bn"]:
        layers.append(keras.layers.BatchNormalization())
    for _ in range(config["depth"]):
        if config["bn"]:
            layers += [keras.layers.Dense(config["units"], kernel_initializer="he_normal"),
                       keras.layers.BatchNormalization(),
                       keras.layers.Activation("elu")]
        else:
            layers.append(keras.layers.Dense(config["units"], activation="elu",
                                             kernel_initializer="he_normal"))
    layers.append(keras.layers.Dense(data.num_classes, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Nadam(config["learning_rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
