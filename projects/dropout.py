"""dropout: a small model with Dropout; ``fit()`` reports the loss with units dropped.

Reproduces the first of the three usual explanations of why training metrics
differ from test metrics (the Keras FAQ's "Why is my training loss much higher
than my testing loss?"): Dropout is active while ``fit()`` measures and off in
``evaluate()``, so ``fit()`` reports a worse loss than ``evaluate()`` on the very
same data. gaptrack shows it as ``gap/<m>/mode``; the rest of the gap is drift
(the epoch's per-batch average over a model that keeps changing).

Model: Flatten -> Dense(128, relu) -> Dropout(``dropout``) -> Dense(softmax),
Adam, sparse categorical cross-entropy, accuracy.
"""

from projects.params import common, number

PARAMS = {
    **common(dataset="digits", samples="all", epochs=5, batch_size=32, learning_rate=1e-3,
             validation_split=0.2),
    "dropout": number(0.5, 0, 1, high_open=True),
}


def model(config, data):
    import keras

    model = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(config["dropout"]),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
