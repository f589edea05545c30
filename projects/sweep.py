"""A grid of one scenario as nested MLflow runs, then the runs ranked by gap.

A grid is written ``name=v1,v2;name=v1,v2``: every combination of the values
is one child run of the active (parent) run, with the other parameters fixed.
When all have run, :func:`gaptrack.rank_runs` ranks the children (filter
``tags.mlflow.parentRunId = '<parent>'``) by ``|gap_final/<metric>|``, the gap
between ``fit()`` and ``evaluate()`` at the last epoch; the ranking is printed
and logged to the parent twice: ``ranking.csv``, and ``ranking.json`` by
``mlflow.log_table``, which the UI's artifact view shows as a table.

The parent run is named by what it holds, ``<entry point>: <scenario> <grid
names joined by ×>`` (``main: deep_mlp bn × batch_size``); under ``mlflow run``
it is the run ``mlflow run`` created, renamed.
"""

import itertools

from projects.params import ParamError

#: The ranking as a table artifact, beside ``ranking.csv``.
RANKING_TABLE = "ranking.json"


def parse_grid(text, params, what):
    """``"a=1,2;b=x"`` to ``[("a", [1, 2]), ("b", ["x"])]``, values converted
    and checked by ``params`` (``{name: Param}``) of ``what`` (for messages)."""
    grid = []
    for part in filter(None, (p.strip() for p in str(text).split(";"))):
        name, eq, values = part.partition("=")
        name = name.strip().replace("-", "_")
        values = [v.strip() for v in values.split(",")]
        if not eq or not name or not all(values):
            raise ParamError(f"grid {text!r} is not of the form name=v1,v2;name=v1,v2 "
                             f"(at {part!r})")
        if name not in params:
            raise ParamError(f"grid parameter {name!r} is not accepted by {what}; accepted: "
                             f"{', '.join(sorted(params))}")
        if name in dict(grid):
            raise ParamError(f"grid parameter {name!r} is given twice in {text!r}")
        grid.append((name, [params[name].convert(name, v) for v in values]))
    if not grid:
        raise ParamError(f"grid {text!r} is empty; write it name=v1,v2;name=v1,v2")
    return grid


def run_grid(entry_point, scenario, fixed, grid, metric, parent_params):
    """Train every grid point as a child run of one parent run, then print
    the children ranked by gap.

    Args:
        entry_point: ``main`` or ``sweep``, for the parent run's name.
        scenario: the scenario's name.
        fixed: ``{param: value}``, every parameter of the scenario; the grid's
            values replace theirs.
        grid: from :func:`parse_grid`.
        metric: the compiled metric ranked by (``loss``, ``accuracy``...).
        parent_params: params of the parent run (not logged again when
            ``mlflow run`` logged them).

    Returns:
        ``(parent run id, ranking DataFrame)``.
    """
    import mlflow

    import gaptrack
    from projects.experiment import declare_kind
    from projects.training import log_new_params, train

    names = [name for name, _ in grid]
    points = list(itertools.product(*(values for _, values in grid)))
    # under `mlflow run`, start_run resumes its run and gives it this name
    with mlflow.start_run(run_name=f"{entry_point}: {scenario} {' × '.join(names)}") as parent:
        declare_kind(parent.info.experiment_id)
        log_new_params(parent_params)
        for i, values in enumerate(points, 1):
            point = dict(zip(names, values))
            label = " ".join(f"{k}={v}" for k, v in point.items())
            print(f"--- {scenario} {label} ({i}/{len(points)})", flush=True)
            train(scenario, {**fixed, **point}, nested=True, run_name=f"{scenario} {label}")
        parent_id = parent.info.run_id
        ranking = gaptrack.rank_runs(parent.info.experiment_id, metric=metric,
                                     filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        mlflow.log_text(ranking.to_csv(index=False), "ranking.csv")
        mlflow.log_table(ranking, RANKING_TABLE)
    print(f"\nRuns of parent run {parent_id}, ranked by |gap_final/{metric}|: fit() minus "
          f"evaluate() on the training data at the last epoch, and its parts:")
    print(format_ranking(ranking, names))
    return parent_id, ranking


#: Width of the printed ranking when it goes to a log, not a terminal (``mlflow
#: run`` pipes the entry point's output): every column and whole run names.
LOG_WIDTH = 160


def format_ranking(ranking, param_names=()):
    """The ranking's terminal columns (and the given params) as a text table,
    as ``gaptrack compare`` prints it (:mod:`gaptrack.ranktable`), at the
    terminal's width (``COLUMNS``), else :data:`LOG_WIDTH`."""
    import shutil

    from gaptrack import ranktable

    present = [p for p in param_names if f"params.{p}" in ranking]
    width = shutil.get_terminal_size((LOG_WIDTH, 24)).columns
    return ranktable.terminal(ranktable.select(ranking, params=present), width).rstrip("\n")
