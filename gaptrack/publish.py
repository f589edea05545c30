"""What the tracker sends to MLflow beyond an epoch's metrics: the epoch's step
images and, at train end, the report, its files and the run's description.

Everything goes through the run's :class:`gaptrack.tracking.RunLogger` (spooled,
sent in the background); the report is built from the tracker's own records.
"""

from gaptrack import charts, keys
from gaptrack.record import RunHistory, loss_first, natural_order
from gaptrack.render import Rendering
from gaptrack.report import build_report


def log_epoch_images(logger, record):
    """The epoch's decomposition and BN staleness as step images, which the
    MLflow UI's image charts step through epoch by epoch."""
    names = loss_first(record.parts)
    logger.log_image(charts.png(charts.epoch_decomposition_figure(record, names)),
                          keys.DECOMPOSITION_IMAGE, record.step)
    if record.staleness:
        figure = charts.epoch_staleness_figure(record, natural_order(record.staleness))
        logger.log_image(charts.png(figure), keys.STALENESS_IMAGE, record.step)


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
    logger.set_tags(keys.diagnosis_tags(report.diagnosis))
    logger.set_description(rendering.description())
    for name, data in artifacts.items():
        logger.log_bytes(data, f"{keys.REPORT_DIR}/{name}")
