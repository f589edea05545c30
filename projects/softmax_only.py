"""softmax_only: one Dense softmax layer, no Dropout, no BN: the whole gap is drift.

Reproduces the third usual explanation (Keras FAQ, "Why is my training loss much
higher than my testing loss?"): the loss ``fit()`` reports is the average over the
epoch's batches, each measured before that batch's update, while ``evaluate()``
measures the model as it is at the end of the epoch. With nothing that behaves
differently in training (no Dropout, no BN, no regulariser), training mode and
inference mode compute the same thing: ``gap/<m>/mode`` and ``gap/<m>/bn_ema``
are 0 and ``gap/<m> == gap/<m>/drift``. Early on, while the model improves fast,
``fit()`` looks worse than ``evaluate()``.

Model: Flatten -> Dense(softmax) (multinomial logistic regression), Adam, sparse
categorical cross-entropy, accuracy.
"""

from projects.params import common

PARAMS = common(dataset="digits", samples="all", epochs=5, batch_size=32, learning_rate=1e-3,
                validation_split=0.2)


def model(config, data):
    import keras

    model = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
