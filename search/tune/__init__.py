"""The search on Ray Tune: the only package that imports Ray. A search is a Ray Tune ``Tuner`` whose trials each
run ``drcapsnet.train``; Optuna (through Ray's ``OptunaSearch``, seeded, persisted in an RDB storage) proposes the
hyperparameters, a ``ConcurrencyLimiter`` bounds the trials in flight, a Tune scheduler (ASHA by default) stops weak
trials, and every trial records itself in MLflow through ``search.tracking``.

One concept per module, in the order a search meets them:

- ``lifecycle``: ``run_search``, the lifecycle (check, start Ray, open or resume, build the tuner, fit, close);
- ``runtime``: Ray itself (start or join, quiet libraries, Ctrl-C as Tune handles it, Ray Client on the head);
- ``searcher``: what proposes and stops trials (drcaps' Optuna searcher, the scheduler, a trial's names);
- ``studies``: the Optuna study (its storage, its tables, kept in step with Ray on resume and at the end);
- ``trial``: one trial in its worker (train, report to Tune and MLflow, checkpoint, its time breakdown);
- ``live``: the Tune callback that feeds the live view (search/progress.py);
- ``lean``: what Tune's driver keeps per trial, cut to what drcaps reads back (less memory per trial);
- ``results``: the end (ranked trials, MLflow runs closed, best model registered, report, ``SearchResult``).

Ray is imported inside functions, so ``import search.tune`` stays cheap. Import from here: the names below are the
package's API.
"""

from search.errors import ClusterError
from search.state import STATE_FILE
from search.tune.lifecycle import check_search, run_search, search_params, smoke_experiment
from search.tune.results import SearchResult, TrialSummary
from search.tune.runtime import init_ray, is_ray_client, run_on_head, scoped_env, tune_interrupt_watch
from search.tune.searcher import TRIAL_NUMBER, make_scheduler, make_searcher, split_config, trial_dirname
from search.tune.studies import OPTUNA_STORAGE_ENV, optuna_storage_url
from search.tune.trial import FAILURE_KEY, TrialContext, run_trial, same_data, shared_datasets

__all__ = ["FAILURE_KEY", "OPTUNA_STORAGE_ENV", "STATE_FILE", "TRIAL_NUMBER", "ClusterError", "SearchResult",
           "TrialContext", "TrialSummary", "check_search", "init_ray", "is_ray_client", "make_scheduler",
           "make_searcher", "optuna_storage_url", "run_on_head", "run_search", "run_trial", "same_data",
           "scoped_env", "search_params", "shared_datasets", "smoke_experiment", "split_config", "trial_dirname",
           "tune_interrupt_watch"]
