"""batchnorm: a small model with BatchNormalization; its moving averages lag.

Reproduces the second usual explanation (after the Keras FAQ's "Why is my
training loss much higher than my testing loss?", which names Dropout and
regularisers): a layer that computes differently in training. During ``fit()``
BatchNormalization normalises each batch with that batch's own statistics, and
``evaluate()`` with its moving averages, which follow by ``1 - bn_momentum`` per
step (0.01 with Keras' default 0.99) and so are stale after few steps. gaptrack
splits this into ``gap/<m>/mode`` (batch statistics vs accurate population
statistics, PreciseBN) and ``gap/<m>/bn_ema`` (accurate vs moving statistics);
``staleness/mean/<layer>`` and ``staleness/var/<layer>`` say how stale they are. Lower
``bn_momentum`` (e.g. 0.9) and the ``bn_ema`` part shrinks.

Model: Flatten -> Dense(128) -> BatchNormalization(``bn_momentum``) -> ReLU ->
Dense(softmax), Adam, sparse categorical cross-entropy, accuracy.
"""

from projects.params import common, number

PARAMS = {
    **common(dataset="digits", samples="all", epochs=5, batch_size=32, learning_rate=1e-3,
             validation_split=0.2),
    "bn_momentum": number(0.99, 0, 1, high_open=True),
}


def model(config, data):
    import keras

    model = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(128),
        keras.layers.BatchNormalization(momentum=config["bn_momentum"]),
        keras.layers.ReLU(),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
