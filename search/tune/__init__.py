"""The search on Ray Tune: the only package that imports Ray. It runs a plan (search/plan.py) and returns what the
search recorded (:class:`SearchRecords`); search/publish.py does everything after. A search is a Ray Tune ``Tuner``
whose trials each run ``drcapsnet.train``; drcaps' own Optuna searcher (Optuna's public ask/tell, seeded, persisted in
an RDB storage: search/storage.py) proposes the hyperparameters, a ``ConcurrencyLimiter`` bounds the trials in flight,
a Tune scheduler (ASHA by default) stops weak trials, and every trial records itself in MLflow through
``search.tracking``.

One concept per module, in the order a search meets them:

- ``lifecycle``: ``run_search``, the lifecycle (start Ray, open or resume, build the tuner, fit, close, confirm);
- ``runtime``: Ray itself (start or join, quiet libraries, Ctrl-C as Tune handles it, Ray Client on the head);
- ``searcher``: what proposes and stops trials (drcaps' Optuna searcher, the scheduler, a trial's names);
- ``studies``: the Optuna study kept in step with Ray on resume and at the end;
- ``trial``: one trial in its worker (train, report to Tune and MLflow, checkpoint, its time breakdown);
- ``confirm``: the top-k trained again with new seeds before the winner is crowned;
- ``live``: the Tune callback that feeds the live view (search/progress.py);
- ``lean``: what Tune's driver keeps per trial, cut to what drcaps reads back (less memory per trial);
- ``results``: what a run recorded (ranked trials, MLflow trial runs closed, confirmation runs).

Ray is imported inside functions, so ``import search.tune`` stays cheap. Import from here: the names below are the
package's API.
"""

from search.tune.lifecycle import OpenSearch, run_search, search_params
from search.tune.results import ConfirmRun, SearchRecords, TrialSummary, scored
from search.tune.runtime import init_ray, is_ray_client, run_on_head, scoped_env, tune_interrupt_watch
from search.tune.searcher import TRIAL_NUMBER, make_scheduler, make_searcher, split_config, trial_dirname
from search.tune.trial import FAILURE_KEY, TrialContext, run_trial, same_data, shared_datasets

__all__ = ["FAILURE_KEY", "TRIAL_NUMBER", "ConfirmRun", "OpenSearch", "SearchRecords", "TrialContext",
           "TrialSummary", "init_ray", "is_ray_client", "make_scheduler", "make_searcher", "run_on_head", "run_search",
           "run_trial", "same_data", "scored", "scoped_env", "search_params", "shared_datasets", "split_config",
           "trial_dirname", "tune_interrupt_watch"]
