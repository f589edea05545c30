"""Rank MLflow runs by how far Keras' ``fit()`` and ``evaluate()`` disagree.

What is compared. For a compiled metric ``m`` (``loss``, ``accuracy``, ...) every
run tracked by gaptrack logged, per epoch, ``gap/<m> = fit/<m> - eval_train/<m>``:
what ``fit()`` reported minus what ``evaluate()`` says on the training data, and
its parts ``gap/<m>/drift``, ``gap/<m>/mode`` and ``gap/<m>/bn_ema``. Once, when
``fit()`` ends, it logged three summaries of that history:

- ``gap_final/<m>``: the signed gap at the last epoch (the model you keep);
- ``gap_max_abs/<m>``: ``max |gap|`` over the epochs (the worst epoch);
- ``gap_mean_abs/<m>``: ``mean |gap|`` over the epochs (a typical epoch).

``rank_runs`` orders runs by the absolute value of one summary, largest first.

How the tracking server is used. Sorting and filtering are done by the server
(``MlflowClient.search_runs`` with ``order_by`` on the summary metric), page by
page, and only the runs returned are held in memory; no metric history is fetched
to rank. ``gap_max_abs`` and ``gap_mean_abs`` are never negative, so "by absolute
value" is the server's descending order. ``gap_final`` is signed and the server
can only sort by the signed value, so it is read as two server-sorted streams,
``gap_final >= 0`` descending and ``gap_final < 0`` ascending (most negative
first); each stream is ordered by ``|gap_final|``, and merging them lazily gives
the ranking, fetching the next page of a stream only when its rows are used.
With ``top_k``, the negative stream asks only for runs at least as far from 0
as the ``top_k``-th positive one (no other can rank): a filter that few runs
pass, which the server answers without sorting every run.
Every ranking query also filters on the summary metric itself (``>= 0`` or
``< 0``); besides selecting the runs that have it, this keeps SQLite's query
planner fast (with the ``order_by`` join alone, or with a ``!=`` filter, it
scans quadratically: seconds for 10,000 runs).

A NaN gap (a diverged loss) ranks last. Only ``!=`` lets a NaN through an MLflow
filter, so the runs with a NaN summary come from one more query, ``!= 0``,
unordered (NaNs tie), read only once the finite runs are used up: a ranking
asking for more runs than have a finite gap reads those runs twice.

Which runs are ranked. A run is tracked by gaptrack iff it has the tag
``gaptrack.version``. Runs matching the filter without it are left out and
counted in ``ranking.attrs["untracked_runs"]`` (counting them pages through
those runs). Report runs (tag ``gaptrack.report``, see ``log_comparison``) are
neither ranked nor counted. A tracked run that has not logged the summary of
``m`` (still running, or stopped before ``fit()`` ended) has nothing to rank by
and is not listed.
"""

import heapq
import html
import itertools
import math

import pandas as pd
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gaptrack.keys import (DIAGNOSIS_TAG, EVAL_TRAIN, FIT, GAP, GAP_CURVES, PARTS, RANKING_PAGE,
                           RANKING_TABLE, REPORT_TAG, SUMMARIES, VERSION_TAG, measured_metrics, metric_key, part_key, summary_key)

_PAGE_SIZE = 1000
_PLOTTED_RUNS = 10
_LISTED_NAMES = 20
_COLUMNS = ("rank", "run_id", "run_name", "experiment", "status",
            *(f"{GAP}_{key}" for key in SUMMARIES), "fit", "eval_train", "gap", *PARTS, "diagnosis")


class CompareError(Exception):
    """A comparison that cannot be made; the message names the bad value and
    what would be accepted."""


def rank_runs(experiments, metric="loss", by="final", filter_string="",
              top_k=None, tracking_uri=None):
    """Rank runs by the gap between ``fit()`` and ``evaluate()``, largest first.

    Args:
        experiments: an experiment name or id, or a list of them. A value is
            looked up as a name first, then as an id.
        metric: the compiled Keras metric to compare, as Keras names it
            (``"loss"``, ``"accuracy"``, ``"sparse_categorical_accuracy"``...).
        by: the summary ranked by: ``"final"`` (``|gap_final/<metric>|``),
            ``"max_abs"`` (``gap_max_abs/<metric>``) or ``"mean_abs"``
            (``gap_mean_abs/<metric>``).
        filter_string: an MLflow search filter the runs must also match,
            e.g. ``"params.batch_size = '32'"``. Metric keys with ``/`` need
            backticks: ``"metrics.`fit/loss` < 0.5"``.
        top_k: keep only the first ``top_k`` runs; ``None`` keeps all.
        tracking_uri: the tracking server or store; defaults to MLflow's
            (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``).

    Returns:
        A DataFrame, one row per run in rank order, with columns ``rank``,
        ``run_id``, ``run_name``, ``experiment``, ``status``, ``gap_final``,
        ``gap_max_abs``, ``gap_mean_abs`` (the run's summaries of ``metric``),
        ``fit``, ``eval_train``, ``gap``, ``drift``, ``mode``, ``bn_ema`` (the
        last logged values of ``fit/<metric>``, ``eval_train/<metric>``,
        ``gap/<metric>`` and its parts), ``diagnosis`` and one ``params.<name>``
        column per run parameter. ``attrs`` holds ``untracked_runs`` (runs
        matching the filter that gaptrack did not track) and the query:
        ``metric``, ``by``, ``experiment_ids``, ``filter_string``, ``top_k``,
        ``tracking_uri``.

    Raises:
        CompareError: unknown experiment or metric, no tracked run, invalid
            filter or unreachable tracking server.

    Example:
        >>> import gaptrack
        >>> ranking = gaptrack.rank_runs("mnist", metric="accuracy",
        ...                              by="max_abs", top_k=5)
        >>> ranking[["rank", "run_name", "gap_max_abs", "diagnosis"]]
    """
    if by not in SUMMARIES:
        raise CompareError(f"ranking key {by!r} not known; use one of: {', '.join(SUMMARIES)}")
    if top_k is not None and top_k < 1:
        raise CompareError(f"top_k must be >= 1, got {top_k}")
    client, uri = _client(tracking_uri)
    found = _resolve_experiments(client, experiments)
    ids = [e.experiment_id for e in found]
    names = {e.experiment_id: e.name for e in found}
    tracked = _and(filter_string, f"tags.`{VERSION_TAG}` IS NOT NULL")
    try:
        runs = _ranked(client, ids, tracked, metric, by, top_k)
        untracked = _count(client, ids, _and(filter_string, f"tags.`{VERSION_TAG}` IS NULL",
                                             f"tags.`{REPORT_TAG}` IS NULL"))
    except MlflowException as e:
        if e.error_code == "INVALID_PARAMETER_VALUE":
            raise CompareError(f"filter {filter_string!r} is not a valid MLflow search filter: "
                               f"{e.message}") from None
        raise
    if not runs:
        _explain_empty(client, ids, tracked, metric, by, untracked, names)
    rows = [_row(run, rank, metric, names) for rank, run in enumerate(runs, 1)]
    params = sorted({k for run in runs for k in run.data.params})
    ranking = pd.DataFrame(rows, columns=[*_COLUMNS, *(f"params.{k}" for k in params)])
    ranking.attrs.update(untracked_runs=untracked, metric=metric, by=by, experiment_ids=ids,
                         filter_string=filter_string, top_k=top_k, tracking_uri=uri)
    return ranking


def log_comparison(ranking):
    """Log a ranking as an MLflow run, to open in the MLflow UI.

    The run goes into the first experiment ranked, tagged ``gaptrack.report=true``
    so that later comparisons neither rank it nor count it as untracked. Its
    artifacts: ``ranking.csv`` and ``ranking.html`` (the table) and
    ``gap_curves.png`` (``gap/<metric>`` per epoch for the first runs, fetched
    from their metric history); its params record the query.

    Args:
        ranking: a DataFrame returned by ``rank_runs`` (its ``attrs`` say how it
            was made and where to log).

    Returns:
        The report run's id.

    Example:
        >>> import gaptrack
        >>> from gaptrack.compare import log_comparison
        >>> run_id = log_comparison(gaptrack.rank_runs("mnist", by="max_abs"))
    """
    query = ranking.attrs
    client = MlflowClient(query["tracking_uri"])
    run = client.create_run(query["experiment_ids"][0], run_name="gaptrack-compare",
                            tags={REPORT_TAG: "true"})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[
        Param("metric", query["metric"]), Param("by", query["by"]),
        Param("experiment_ids", ",".join(query["experiment_ids"])),
        Param("filter_string", query["filter_string"]),
        Param("top_k", str(query["top_k"])), Param("untracked_runs", str(query["untracked_runs"])),
    ])
    client.log_text(run_id, ranking.to_csv(index=False), RANKING_TABLE)
    title = html.escape(f"gaptrack: runs ranked by |{summary_key(query['by'], query['metric'])}|")
    table = ranking.to_html(index=False, na_rep="", float_format="{:.6g}".format)
    client.log_text(run_id, f"<html><head><title>{title}</title></head><body>"
                            f"<h1>{title}</h1>{table}</body></html>", RANKING_PAGE)
    client.log_figure(run_id, _gap_curves(client, ranking.head(_PLOTTED_RUNS), query["metric"]),
                      GAP_CURVES)
    client.set_terminated(run_id)
    return run_id


def _gap_curves(client, runs, metric):
    """A figure of ``gap/<metric>`` per epoch, one line per run in ``runs``."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for run in runs.itertuples():
        history = sorted(client.get_metric_history(run.run_id, metric_key(GAP, metric)),
                         key=lambda point: point.step)
        axes.plot([p.step for p in history], [p.value for p in history], marker="o",
                  label=f"#{run.rank} {run.run_name}")
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{metric_key(GAP, metric)} = fit - evaluate")
    axes.set_title(f"fit() minus evaluate() on the training data: {metric}")
    axes.legend(fontsize="small")
    return figure


def _client(tracking_uri):
    """:func:`gaptrack.uris.open_client`, its error as a :class:`CompareError`."""
    from gaptrack.uris import TrackingURIError, open_client

    try:
        return open_client(tracking_uri)
    except TrackingURIError as e:
        raise CompareError(str(e)) from None


def _resolve_experiments(client, experiments):
    """The active experiments named by ``experiments`` (names first, then ids)."""
    if isinstance(experiments, (str, int)):
        experiments = [experiments]
    found = []
    for value in map(str, experiments):
        experiment = client.get_experiment_by_name(value)
        if experiment is None and value.isdigit():
            try:
                experiment = client.get_experiment(value)
            except MlflowException:
                experiment = None
        if experiment is None or experiment.lifecycle_stage != "active":
            known = sorted(e.name for e in client.search_experiments())
            listed = ", ".join(known[:_LISTED_NAMES])
            if len(known) > _LISTED_NAMES:
                listed += f", ... ({len(known) - _LISTED_NAMES} more)"
            raise CompareError(f"experiment {value!r} not found (by name or id); "
                               f"experiments: {listed or '(none)'}")
        if experiment.experiment_id not in {e.experiment_id for e in found}:
            found.append(experiment)
    if not found:
        raise CompareError("no experiment given; pass at least one name or id")
    return found


def _and(*clauses):
    """MLflow filter clauses joined with ``and`` (empty ones dropped)."""
    return " and ".join(c for c in clauses if c)


def _search(client, experiment_ids, filter_string, order_by=None, limit=None):
    """Runs matching the filter, in the server's order, fetched page by page as
    they are consumed; at most ``limit`` runs are requested per page."""
    page_size = min(limit or _PAGE_SIZE, _PAGE_SIZE)
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=page_size,
                                  order_by=order_by, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _ranked(client, experiment_ids, tracked, metric, by, top_k):
    """The tracked runs having ``gap_<by>/<metric>``, by its absolute value,
    largest first (NaN last), at most ``top_k``."""
    value = summary_key(by, metric)
    key = f"metrics.`{value}`"
    if by == "final":
        positive = _search(client, experiment_ids, _and(tracked, f"{key} >= 0"),
                           [f"{key} DESC"], top_k)
        below = f"{key} < 0"
        if top_k is not None:
            positive = list(itertools.islice(positive, top_k))
            kth = positive[-1].data.metrics[value] if len(positive) == top_k else math.inf
            if math.isfinite(kth):  # a negative run ranked needs |gap| >= the k-th's
                below = _and(below, f"{key} <= {-kth!r}")
        negative = _search(client, experiment_ids, _and(tracked, below), [f"{key} ASC"], top_k)
        finite = heapq.merge(positive, negative, key=lambda run: -abs(run.data.metrics[value]))
    else:
        finite = _search(client, experiment_ids, _and(tracked, f"{key} >= 0"),
                         [f"{key} DESC"], top_k)
    # a NaN passes "!=" only; read, unordered, only once the finite runs are used up
    nan = (run for run in _search(client, experiment_ids, _and(tracked, f"{key} != 0"),
                                  limit=top_k)
           if math.isnan(run.data.metrics[value]))
    return list(itertools.islice(itertools.chain(finite, nan), top_k))


def _count(client, experiment_ids, filter_string):
    """How many runs match the filter."""
    return sum(1 for _ in _search(client, experiment_ids, filter_string))


def _explain_empty(client, experiment_ids, tracked, metric, by, untracked, names):
    """Raise the CompareError that says why nothing could be ranked."""
    runs = client.search_runs(experiment_ids, tracked, max_results=_PAGE_SIZE)
    if not runs:
        where = ", ".join(repr(names[i]) for i in experiment_ids)
        raise CompareError(f"no runs tracked by gaptrack (tag {VERSION_TAG}) in experiment {where} "
                           f"matching the filter; {untracked} runs there were not tracked")
    have = sorted({m for run in runs for m in measured_metrics(run.data.metrics)})
    if metric not in have:
        raise CompareError(f"metric {metric!r} not found; tracked runs have: "
                           f"{', '.join(have) or '(no gap metrics)'}")
    raise CompareError(f"no tracked run has {summary_key(by, metric)} yet: gaptrack logs it when "
                       f"fit() ends, and the runs with {metric_key(GAP, metric)} are still running "
                       "or stopped early")


def _row(run, rank, metric, experiment_names):
    """One ranking row: who the run is and its last logged values of ``metric``."""
    logged = run.data.metrics
    row = {
        "rank": rank,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment": experiment_names[run.info.experiment_id],
        "status": run.info.status,
    }
    for key in SUMMARIES:
        row[f"{GAP}_{key}"] = logged.get(summary_key(key, metric), math.nan)
    for column, key in ((FIT, metric_key(FIT, metric)), (EVAL_TRAIN, metric_key(EVAL_TRAIN, metric)),
                        (GAP, metric_key(GAP, metric)), *((p, part_key(metric, p)) for p in PARTS)):
        row[column] = logged.get(key, math.nan)
    row["diagnosis"] = run.data.tags.get(DIAGNOSIS_TAG, "")
    row.update((f"params.{k}", v) for k, v in run.data.params.items())
    return row
