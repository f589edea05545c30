"""What ``fit()``'s parameters tell the tracker: its batch size, and whether the
data given to the tracker is the data ``fit()`` trains on.

``fit()`` tells a callback its number of steps per epoch, not its batch size,
which the training-mode and PreciseBN measurements depend on.
"""

import warnings

from gaptrack.probe import ProbeWarning

#: Keras' default batch size for in-memory data.
KERAS_DEFAULT_BATCH_SIZE = 32


class BatchSizeWarning(UserWarning):
    """The training batch size had to be guessed."""


def infer_batch_size(samples, steps):
    """The batch sizes ``b`` for which ``samples`` in ``steps`` steps is possible.

    ``ceil(samples / b) == steps`` holds for ``samples/steps <= b <
    samples/(steps-1)``: 1,000 samples in 16 steps fits 63 to 66.

    Returns:
        ``range`` of the possible batch sizes (empty when none fits). With one
        step, every ``b >= samples`` fits and all give the same single batch,
        so ``range(samples, samples + 1)``.
    """
    if not samples or not steps or steps <= 0:
        return range(0)
    low = -(-samples // steps)
    if steps == 1:
        return range(low, low + 1)
    high = -(-samples // (steps - 1)) - 1
    return range(low, high + 1) if low <= high else range(0)


def guess_batch_size(probe, steps):
    """fit's batch size: a dataset's own, else the one that fits the steps per
    epoch, else a guess with a :class:`BatchSizeWarning` naming the range."""
    if probe.dataset_batch_size:
        return probe.dataset_batch_size
    candidates = infer_batch_size(probe.total, steps)
    if len(candidates) == 1:
        return candidates[0]
    guess = (KERAS_DEFAULT_BATCH_SIZE if KERAS_DEFAULT_BATCH_SIZE in candidates or not candidates
             else candidates[0])
    if candidates:
        why = (f"{probe.total} samples in {steps} steps fits batch sizes "
               f"{candidates[0]} to {candidates[-1]} (if the data given to the tracker is "
               "what fit() trains on: with validation_split, give it the training part only)")
    else:
        why = "the number of training steps is not known"
    warnings.warn(
        f"gaptrack: {why}; assuming batch_size={guess}. Pass "
        "GapTracker(..., batch_size=<fit's batch_size>) to measure at the right one.",
        BatchSizeWarning, stacklevel=3,
    )
    return guess


def check_steps(probe, batch_size, steps):
    """Warn when the tracker's data has more samples than fit's steps per epoch
    at the batch size cover: fit trains on part of it only (``validation_split``).
    (Fewer is a sample of the training data, e.g. an explicit probe.)"""
    if not steps or not probe.total or probe.total <= steps * batch_size:
        return
    low, high = (steps - 1) * batch_size + 1, steps * batch_size
    warnings.warn(
        f"gaptrack: fit() runs {steps} steps per epoch at batch_size={batch_size}, "
        f"i.e. {low} to {high} samples, but the tracker was given {probe.total}: it "
        "measures data fit() does not train on. With fit(validation_split=s) give it the "
        "training part only, GapTracker((x[:n], y[:n]), ...) with n = int(len(x) * (1 - s)) "
        "(gaptrack.autolog() does so).",
        ProbeWarning, stacklevel=3,
    )
