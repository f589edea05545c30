"""What the tracker sends to MLflow beyond an epoch's metrics: the epoch's step
images (rendered off the training thread) and, at train end, the report, its
files and the run's description.

Everything goes through the run's :class:`gaptrack.tracking.RunLogger` (spooled,
sent in the background); the report is built from the tracker's own records.
"""

from gaptrack import keys, stepcharts
from gaptrack.record import RunHistory, loss_first, natural_order
from gaptrack.render import Rendering
from gaptrack.report import build_report


class EpochImages:
    """Renders each measured epoch's step images (:mod:`gaptrack.stepcharts`) in
    a thread of its own, so that the training thread does not wait for them, and
    queues them on the run's ``logger``, one epoch at a time, in order: the
    decomposition and the BN staleness, which the MLflow UI's image charts step
    through epoch by epoch.

    A failure shows in the training thread: :meth:`check` raises the first one
    of the renders that ended, for the tracker's guard to turn into its warning.
    """

    def __init__(self, logger):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.logger = logger
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gaptrack-images")
        self._pending = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, record):
        """Render and queue ``record``'s images in the background."""
        self._pending.append(self._pool.submit(self._log, record))

    def _log(self, record):
        images = [] if self._closed else _epoch_images(record)
        with self._lock:  # nothing is queued once finish() returned
            if not self._closed:
                for png, key in images:
                    self.logger.log_image(png, key, record.step)

    def check(self):
        """Raise the first failure of the renders that ended (each once)."""
        done = [future for future in self._pending if future.done()]
        self._pending = [future for future in self._pending if not future.done()]
        for future in done:
            future.result()

    def finish(self, timeout):
        """Wait at most ``timeout`` seconds for the renders not yet done (the
        rest is dropped), then :meth:`check`; the thread ends."""
        from concurrent.futures import wait

        wait(self._pending, timeout)
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.check()


def _epoch_images(record):
    """``[(PNG bytes, image key)]`` of one epoch: its decomposition, and its BN
    staleness when it has BN layers."""
    images = [(stepcharts.decomposition_png(record, loss_first(record.parts)),
               keys.DECOMPOSITION_IMAGE)]
    if record.staleness:
        images.append((stepcharts.staleness_png(record, natural_order(record.staleness)),
                       keys.STALENESS_IMAGE))
    return images


def log_report(logger, records, tags):
    """Tag the diagnosis, describe the run and log the report files of the run
    ``logger`` writes to, within what is left of its ``close_timeout``.

    Args:
        logger: the run's :class:`gaptrack.tracking.RunLogger`.
        records: the tracker's history (``[EpochRecord]``).
        tags: the tags the tracker set (the report reads the probe and batch size).
    """
    found = logger.wait_for_run(logger.remaining_budget())
    run_id, run_name = found or (logger.run_id or "(not yet created)",) * 2
    report = build_report(RunHistory(run_id=run_id, run_name=run_name,
                                     records=records, tags=dict(tags)))
    rendering = Rendering(report)
    artifacts = rendering.artifacts()
    logger.set_tags(keys.diagnosis_tags(report.evidence))
    logger.set_description(rendering.description())
    for name, data in artifacts.items():
        logger.log_bytes(data, f"{keys.REPORT_DIR}/{name}")
