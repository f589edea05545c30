"""dense_l2: one batch of 32 samples, trained on and validated on; ``fit`` is pre-update.

Reproduces the recurring question "the training and the validation data are the
same, why do loss and val_loss differ?" (e.g. keras-team/keras #3562, #4531): a
small MLP with L2-regularised layers is fitted on a single batch of 32 samples,
with that batch as validation data, for one epoch. No Dropout and no BN, so
training and inference mode compute the same loss, L2 penalty included; yet
``loss`` and ``val_loss`` differ, because ``fit()`` reports the loss computed in
the step, *before* the step's update, and validation runs after it. With one
batch per epoch, ``fit/loss`` is exactly the untrained model's loss on the batch,
and ``val/loss`` equals ``eval_train/loss`` (the same batch, after the update):
the whole gap is drift. With more epochs, each epoch's ``fit/loss`` equals the
previous epoch's ``val/loss``.

Data: the first ``batch_size`` training samples of the data set, as the training
and the validation data. Model: Flatten -> Dense(128, relu, L2(``l2``)) ->
Dense(64, relu, L2(``l2``)) -> Dense(softmax); Adam(``learning_rate``), sparse
categorical cross-entropy, accuracy.
"""

from projects.params import ParamError, common, number
from projects.training import Data

PARAMS = {
    **common(dataset="digits", epochs=1, batch_size=32, learning_rate=0.002),
    "l2": number(0.01, 0, None),
}


def data(config):
    from projects.datasets import load_dataset

    ds = load_dataset(config["dataset"], seed=config["seed"])
    n = config["batch_size"]
    if n > len(ds.x_train):
        raise ParamError(f"batch_size must be at most the {len(ds.x_train)} training samples "
                         f"of {ds.name}, got {n}")
    x, y = ds.x_train[:n], ds.y_train[:n]
    return Data(ds.name, ds.source, x, y, (x, y), ds.num_classes, len(ds.x_train))


def model(config, data):
    import keras

    l2 = keras.regularizers.L2(config["l2"])
    model = keras.Sequential([
        keras.Input(data.x.shape[1:]),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", kernel_regularizer=l2),
        keras.layers.Dense(64, activation="relu", kernel_regularizer=l2),
        keras.layers.Dense(data.num_classes, activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(config["learning_rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
