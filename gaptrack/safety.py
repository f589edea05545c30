"""One policy for "the tracker never breaks training".

Whatever fails inside the tracker while ``fit()`` runs (a measurement, the
report, the snapshot table, setting up the run's logger), training goes on: the
failure becomes one :class:`TrackerWarning` naming what failed, the run is
tagged ``gaptrack.error`` with it, and the rest of the tracker carries on (a
failed measurement leaves ``fit/*`` logged for that epoch). Each kind of
failure is warned about once, not every epoch.

Under the test suite (``GAPTRACK_TESTING=true``) the exception is raised
instead, as MLflow's ``autologging_utils/safety.py`` does under its tests, so
that a bug cannot hide behind a warning.

Refusals of bad arguments (a malformed tracking URI, a ``batch_size`` of 0) are
not failures: they are raised before training starts, naming the value.
"""

import contextlib
import os
import warnings

#: Set to ``true`` to raise the tracker's failures instead of warning.
TESTING_ENV = "GAPTRACK_TESTING"


class TrackerWarning(UserWarning):
    """Something inside the tracker failed; training went on."""


def _testing():
    return os.environ.get(TESTING_ENV, "").lower() in ("1", "true")


class Guard:
    """Catches the tracker's failures, one warning per kind.

    Attributes:
        failures: ``{what: "ExceptionType: message"}`` of what failed, in order.

    Example:
        >>> guard = Guard()
        >>> with guard("measuring epoch 3"):
        ...     measure()
    """

    def __init__(self):
        self.failures = {}

    def reset(self):
        self.failures = {}

    @contextlib.contextmanager
    def __call__(self, what, kind=None):
        """Run the block; a failure becomes a warning naming ``what``.

        Args:
            what: what the block does, for the message ("measuring epoch 3").
            kind: failures of one kind are warned about once (default ``what``).
        """
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the one place that decides
            if _testing():
                raise
            kind = kind or what
            text = f"{type(exc).__name__}: {exc}".splitlines()[0]
            first = kind not in self.failures
            self.failures[kind] = f"{what}: {text}"
            if first:
                warnings.warn(f"gaptrack: {what} failed ({text}); training goes on",
                              TrackerWarning, stacklevel=3)

    @property
    def summary(self):
        """One line of what failed, for the ``gaptrack.error`` tag ('' if nothing)."""
        return "; ".join(self.failures.values())
