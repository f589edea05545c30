"""gaptrack.load_run: a tracked run read back from a real server is the tracker's
own history and report, whether it was logged live or spooled and synced later."""

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

import gaptrack
from builders import blobs, mlp
from conftest import free_port
from gaptrack.report import ReportError
from gaptrack.sync import sync
from gaptrack.tracking import TrackingWarning


def _fit(epochs=3, **tracker_args):
    keras.utils.set_random_seed(0)
    x, y = blobs(128)
    model = mlp(bn=True, dropout=0.2)
    tracker = gaptrack.GapTracker((x, y), batch_size=32, **tracker_args)
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[tracker])
    return model, tracker, history


def _same_report(read, tracked):
    pd.testing.assert_frame_equal(read.to_frame(), tracked.to_frame(), check_exact=True)
    assert (read.diagnosis, read.sentence, read.remedy) == (
        tracked.diagnosis, tracked.sentence, tracked.remedy)


def test_a_live_run_reads_back_as_the_tracker_holds_it(server_uri):
    model, tracker, history = _fit()
    run = gaptrack.load_run(tracker.run_id)
    assert run.run.info.run_id == tracker.run_id and run.run.info.status == "FINISHED"
    pd.testing.assert_frame_equal(run.history, tracker.to_frame(), check_exact=True)
    assert list(run.history.index) == [0, 1, 2]
    assert list(run.history["fit/loss"]) == history.history["loss"]
    _same_report(run.report, tracker.report())
    # the report logged at train end is this one: the run's description holds it
    assert run.report.sentence in run.run.data.tags["mlflow.note.content"]
    assert str(run.report) == str(tracker.report())
    # the BN snapshots, against the layers' own variables at the last epoch
    snapshots = run.bn_snapshots()
    last = snapshots[snapshots.epoch == 2]
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bn:
        rows = last[last.layer == layer.name]
        np.testing.assert_array_equal(rows.moving_mean.to_numpy(),
                                      np.asarray(layer.moving_mean, dtype=np.float64))
    assert repr(run).startswith(f"<gaptrack.TrackedRun {tracker.run_id} ")


def test_a_run_spooled_offline_and_synced_later_reads_back_the_same(server_uri):
    mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.warns(TrackingWarning, match="gaptrack sync"):
        _, tracker, _ = _fit(epochs=2, close_timeout=0.5)
    assert tracker.run_id is None  # never reached a server
    [(_, run_id, sent, error)] = sync(tracker.logger.spool.dir, tracking_uri=server_uri)
    assert error is None and sent > 0
    run = gaptrack.load_run(run_id, tracking_uri=server_uri)
    pd.testing.assert_frame_equal(run.history, tracker.to_frame(), check_exact=True)
    _same_report(run.report, tracker.report())


def test_a_run_gaptrack_did_not_track_is_one_clear_error(server_uri):
    with mlflow.start_run() as plain:
        mlflow.log_metric("loss", 0.5)
    with pytest.raises(ReportError, match=f"run '{plain.info.run_id}' has no gap/<metric> "
                                          "metrics: it was not tracked by gaptrack"):
        gaptrack.load_run(plain.info.run_id)
    with pytest.raises(ReportError, match="run 'nope' not found at tracking URI"):
        gaptrack.load_run("nope")
