"""``drcaps search``: every up-front check (search/preflight.py), the search (search.tune.run_search), then the best
trial's config, every trial as CSV and the report written beside ``out``, and the summary printed. A ``ray://``
address hands the whole command to the cluster's head (search/commands/cluster.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from drcapsnet.errors import UsageError

if TYPE_CHECKING:
    from search.experiment import Experiment
    from search.tune import SearchResult

NODE_TRACKING_ENV = "MLFLOW_TRACKING_URI"   # MLflow's own variable; docker-compose.yml sets it on every Ray node
NODE_STORAGE_ENV = "DRCAPS_STORAGE_PATH"     # Ray's storage_path as the cluster's nodes see it (a shared volume)


def node_defaults(experiment: Path, overrides: list[str], tracking_uri: str | None,
                  storage_path: Path | None) -> tuple[str | None, Path | None]:
    """``(tracking_uri, storage_path)``, each filled in, where the command line and the experiment say nothing, by
    the machine the search driver runs on: the tracking URI from ``MLFLOW_TRACKING_URI``, Ray's storage folder from
    ``DRCAPS_STORAGE_PATH`` (and the Optuna storage from ``DRCAPS_OPTUNA_STORAGE``: search.tune.optuna_storage_url).
    On a node of docker-compose.yml they name the stack's MLflow server, its shared ``runs`` volume and its
    PostgreSQL; elsewhere they are usually unset."""
    from search.experiment import load_experiment

    if tracking_uri is None and os.environ.get(NODE_TRACKING_ENV) \
            and load_experiment(experiment, overrides).tracking.uri is None:
        tracking_uri = os.environ[NODE_TRACKING_ENV]
    if storage_path is None and os.environ.get(NODE_STORAGE_ENV):
        storage_path = Path(os.environ[NODE_STORAGE_ENV])
    return tracking_uri, storage_path


def search_command(experiment: Path, overrides: list[str], *, address: str | None = None,
                   tracking_uri: str | None = None, storage_path: Path | None = None, out: Path | None = None,
                   resume: bool = False, smoke_test: bool = False, verbose: int = 0) -> int:
    """Run the search of the experiment file ``experiment`` (with the dotted ``overrides``) on Ray (here, or the
    cluster at ``address``), tracked at ``tracking_uri``, Ray's results under ``storage_path``; export the best
    trial's config to ``out`` (default ``<experiment name>.best.yaml`` here). ``resume`` continues an interrupted
    search; ``smoke_test``: 2 trials x 1 epoch on few images; ``verbose``: also Ray Tune's own tables and logs."""
    for flag, value in (("--tracking-uri", tracking_uri), ("--address", address)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag}: empty; leave it out for the default, or give a value")
    from search.tune import is_ray_client

    if is_ray_client(address):            # the whole command runs on the cluster's head (docs/cluster.md)
        from search.commands.cluster import search_through_ray_client

        return search_through_ray_client(experiment, overrides, address=address, tracking_uri=tracking_uri,
                                         storage_path=storage_path, out=out, resume=resume, smoke_test=smoke_test,
                                         verbose=verbose)
    tracking_uri, storage_path = node_defaults(experiment, overrides, tracking_uri, storage_path)
    from search import preflight, state, tracking
    from search.experiment import load_experiment
    from search.export import best_experiment, export_best
    from search.progress import summary_lines
    from search.tune import check_search, run_search, smoke_experiment

    exp = load_experiment(experiment, overrides)
    checked = smoke_experiment(exp) if smoke_test else exp   # names, folders and export of what will run
    uri = tracking.resolve_tracking_uri(tracking_uri or exp.tracking.uri)
    storage_root = Path(storage_path or Path.cwd() / "drcaps-runs").resolve()
    out = (out or Path.cwd() / f"{checked.name}.best.yaml").resolve()
    csv = out.with_suffix(".trials.csv")
    preflight.check_output("--out", out)
    preflight.check_output("--out", csv)
    check_search(checked, uri, storage_root, resume)
    state.SearchLock(storage_root / checked.name / state.LOCK_FILE).check_free(checked.name)
    preflight.check_address(address)
    preflight.check_space_corners(checked)
    preflight.check_data(checked.run, dict(checked.search.space))
    try:
        result = run_search(exp, address=address, tracking_uri=uri, storage_path=storage_root,
                            resume=resume, smoke_test=smoke_test, verbose=1 + verbose)
    except KeyboardInterrupt:
        again = f"drcaps search {experiment} --resume" + "".join(
            f" {flag} {value}" for flag, value in (("--storage-path", storage_path),
                                                   ("--tracking-uri", tracking_uri),
                                                   ("--address", address)) if value) + (
            " --smoke-test" if smoke_test else "")
        print(f"interrupted: the search's state is saved; continue it with\n  {again}", file=sys.stderr)
        return 130
    best = result.best
    chosen = best_experiment(result.experiment, best.params, metrics=best.metrics, run_id=result.best_run_id,
                             model_uri=result.model_uri, trial_id=best.trial_id)
    code = 0
    try:                      # the search is recorded; a failed export must not lose it
        path = export_best(chosen, out)
        csv.parent.mkdir(parents=True, exist_ok=True)
        tracking.trials_dataframe(uri, result.parent_run_id).to_csv(csv, index=False)
    except OSError as e:
        name = result.experiment.mlflow_experiment
        print(f"error: --out: could not write {out} ({e.strerror or e}); the search is recorded in MLflow (parent "
              f"run {result.parent_run_id} at {uri}): drcaps export-best --experiment {name} --tracking-uri {uri} "
              "--out FILE", file=sys.stderr)
        path, code = out, 1
    report = _copy_report(result, out.with_name(f"{result.experiment.name}.report.html"))
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print("\n".join(summary_lines(result, export_path=path, csv_path=csv,
                                   links=_links(tracking_uri is None, exp, result), report_path=report)))
    return code


def _copy_report(result: SearchResult, out: Path) -> Path | None:
    """The search's report (written by the search into its Ray folder and logged to its parent run), copied beside
    the exported config where a person looks for it."""
    if result.report_path is None:
        return None
    try:
        shutil.copyfile(result.report_path, out)
        return out
    except OSError as e:
        print(f"warning: could not copy the report to {out} ({e.strerror or e}); it is at {result.report_path}",
              file=sys.stderr)
        return Path(result.report_path)


def _links(default_uri: bool, exp: Experiment, result: SearchResult) -> dict[str, str]:
    """Where to look next: the MLflow UI (and the pages of the search run and the best trial), Optuna Dashboard.
    ``default_uri``: neither the command line nor the machine named a tracking URI."""
    from search import tracking

    uri = result.tracking_uri
    local = not uri.startswith(("http://", "https://"))
    links = {}
    if local:
        links["MLflow UI"] = ("drcaps ui" if default_uri and exp.tracking.uri is None
                              else f"drcaps ui --tracking-uri {uri}") + "   (then open the links below)"
    links["search run (MLflow)"] = tracking.run_url(uri, result.parent_run_id)
    if result.best_run_id:
        links["best trial (MLflow)"] = tracking.run_url(uri, result.best_run_id)
    links["Optuna Dashboard"] = f"optuna-dashboard {result.storage_url}   (pip install optuna-dashboard)"
    return links
