"""The one package that imports MLflow: search/trial runs, per-epoch metrics, the best run, the registered model.

Callers use ``from search import tracking; tracking.child_runs(...)``; every public name is re-exported here from
the module that owns it:

- ``uri``      where the store is and whether it can be used (``resolve_tracking_uri``, ``check_tracking_uri``, ...)
- ``client``   one ``MlflowClient`` per URI, ``with_retry`` on "database is locked", ``ensure_experiment``
- ``runs``     the run lifecycle: parent and trial runs, ``TrialLogger``, ``end_run``, metrics and artifacts written
- ``queries``  reading back: ``RunRecord``, ``child_runs``, ``latest_search_run``, ``best_trial_run``, artifacts
- ``registry`` ``log_and_register_model``, ``load_model``, ``model_version``, ``set_model_alias``, ``model_aliases``,
  ``run_version``

Layout: one parent run per search (tag ``drcaps.role=search``), one child run per Ray trial (``drcaps.role=trial``,
``drcaps.trial_id``, ``mlflow.parentRunId``). Checked against mlflow 3.17.2; MLflow is imported inside functions,
so importing this package is cheap and changes nothing (no environment variable, no logger level).
"""

from __future__ import annotations

from drcapsnet.errors import TrackingError  # the store cannot be used or lacks what was asked for
from search.tracking.client import ensure_experiment, with_retry
from search.tracking.queries import (
    SMOKE_TAG,
    RunRecord,
    best_trial_run,
    child_runs,
    download_artifacts,
    get_run,
    has_artifact,
    latest_search_run,
    metric_history,
    read_text_artifact,
    search_runs,
    trials_dataframe,
)
from search.tracking.registry import (
    load_model,
    log_and_register_model,
    model_aliases,
    model_version,
    run_version,
    set_model_alias,
)
from search.tracking.runs import (
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    TrialLogger,
    end_run,
    find_or_create_trial_run,
    log_metrics,
    log_run_artifact,
    reopen_run,
    run_age_s,
    run_url,
    start_search_run,
)
from search.tracking.uri import (
    DEFAULT_ARTIFACTS,
    DEFAULT_DB,
    SCHEMES,
    check_names,
    check_store_exists,
    check_tracking_uri,
    check_tracking_uri_from_client,
    resolve_tracking_uri,
    sqlite_file_problem,
)

__all__ = [
    "DEFAULT_ARTIFACTS", "DEFAULT_DB", "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "SCHEMES", "SMOKE_TAG",
    "RunRecord", "TrackingError", "TrialLogger",
    "best_trial_run", "check_names", "check_store_exists", "check_tracking_uri", "check_tracking_uri_from_client",
    "child_runs", "download_artifacts", "end_run", "ensure_experiment", "find_or_create_trial_run", "get_run",
    "has_artifact",
    "latest_search_run", "load_model", "log_and_register_model", "log_metrics", "log_run_artifact", "metric_history",
    "model_aliases", "model_version", "read_text_artifact", "run_version", "set_model_alias",
    "reopen_run", "resolve_tracking_uri", "run_age_s", "run_url",
    "search_runs", "sqlite_file_problem", "start_search_run", "trials_dataframe", "with_retry",
]
