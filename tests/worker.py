"""One tracked training in its own process, for the concurrency and auth tests.

Usage: python worker.py SEED OUT.json [own]  (tracking URI from MLFLOW_TRACKING_URI)
With ``own`` the tracker creates the run itself; otherwise the worker starts it
and logs a param. Writes the History, the run id and gaptrack's warnings to OUT.json.
"""

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import mlflow  # noqa: E402

import gaptrack  # noqa: E402
from builders import blobs, mlp  # noqa: E402


def main(seed, out, own=False):
    keras.utils.set_random_seed(seed)
    x, y = blobs(64 + 8 * seed, seed=seed)
    model = mlp(bn=seed % 2 == 0, dropout=0.2 if seed % 2 else 0.0)
    tracker = gaptrack.GapTracker((x, y), batch_size=16, close_timeout=120.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if own:
            history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[tracker])
            run_id = tracker.run_id
        else:
            with mlflow.start_run(run_name=f"worker-{seed}") as run:
                mlflow.log_param("seed", seed)
                history = model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                                    callbacks=[tracker])
            run_id = run.info.run_id
    with open(out, "w") as f:
        json.dump({"run_id": run_id, "history": history.history,
                   "probe_size": len(x),
                   "warnings": [str(w.message) for w in caught
                                if issubclass(w.category, gaptrack.tracking.TrackingWarning)]}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], own=sys.argv[3:] == ["own"])
