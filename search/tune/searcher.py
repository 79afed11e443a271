"""What proposes the trials: drcaps' Optuna searcher (Ray's ``OptunaSearch`` told what drcaps ranks by), the Tune
scheduler that stops weak trials, and the names a trial carries (its Optuna number, its folder, its MLflow run name).
"""

from __future__ import annotations

import math
from typing import Any

from search.experiment import Experiment
from search.progress import format_params
from search.space import make_sampler, to_distributions
from search.sqlite_tuning import tuned_optuna_storage


def make_scheduler(exp: Experiment, max_t: int) -> Any:
    """The Tune scheduler of ``search.scheduler`` over ``max_t`` epochs (ASHA, median stopping, or none)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    sched = exp.search.scheduler
    if sched.name == "asha":
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t,
                                       grace_period=min(sched.grace_period, max_t),
                                       reduction_factor=sched.reduction_factor)
    if sched.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=sched.grace_period,
                                  min_samples_required=3)
    return FIFOScheduler()


TRIAL_NUMBER = "drcaps_trial"   # config key carrying the Optuna trial number to the trial (not a searched field)


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A Ray trial's config -> (the searched params, the Optuna trial number)."""
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER}
    number = config.get(TRIAL_NUMBER)
    return params, int(number) if number is not None else None


def _searcher_class() -> type:
    """Ray's ``OptunaSearch``, made to tell Optuna what drcaps ranks by (built lazily: Ray is imported here).

    - value of a trial = the best value of the metric at any epoch (the one ranking of drcaps), not the last;
    - every epoch's value is an intermediate value, the last one included (Ray's class skips the final result);
    - a trial the scheduler stopped before ``max_epochs`` is PRUNED, a failed or diverged one FAIL;
    - the objective carries the metric's name, each trial its MLflow run id (user attribute ``mlflow_run_id``);
    - the Optuna trial number travels to the trial in its config (``drcaps_trial``), so Ray, MLflow and Optuna
      call a trial by the same number.
    """
    global _Searcher
    if _Searcher is not None:
        return _Searcher
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class DrcapsOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
            self._max_epochs = max_epochs
            self._best: dict[str, float] = {}
            self._steps: dict[str, int] = {}
            super().__init__(*args, **kwargs)

        def _setup_study(self, mode: Any) -> None:
            super()._setup_study(mode)
            if self._ot_study is not None and self._metric:
                self._ot_study.set_metric_names([self._metric])

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if params is not None:
                params[TRIAL_NUMBER] = self._ot_trials[trial_id].number
            return params

        def _record(self, trial_id: str, result: dict) -> None:
            value, step = result.get(self._metric), result.get("epoch", result.get("training_iteration"))
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or not isinstance(value, int | float) or step is None:
                return
            try:
                if isinstance(result.get("mlflow_run_id"), str):
                    ot_trial.set_user_attr("mlflow_run_id", result["mlflow_run_id"])
                if not math.isfinite(value):
                    return
                if self._steps.get(trial_id, 0) < int(step):
                    ot_trial.report(float(value), int(step))
                    self._steps[trial_id] = int(step)
            except optuna.exceptions.UpdateFinishedTrialError:
                # --resume after a killed driver: Ray's older snapshot re-runs a trial that driver had already told
                # Optuna about. Optuna's record stands; nothing more is sent for it.
                self._completed_trials.add(trial_id)
                return
            best = self._best.get(trial_id)
            if best is None or (value > best if self._mode == "max" else value < best):
                self._best[trial_id] = float(value)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self._completed_trials:
                self._record(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if result:
                self._record(trial_id, result)
            epochs = int((result or {}).get("epoch", self._steps.get(trial_id, 0)))
            best = self._best.get(trial_id)
            state, value = optuna.trial.TrialState.COMPLETE, best
            if error or best is None or (result and not math.isfinite(result.get(self._metric, 0.0))):
                state, value = optuna.trial.TrialState.FAIL, None
            elif epochs < self._max_epochs:
                state = optuna.trial.TrialState.PRUNED
            try:
                self._ot_study.tell(self._ot_trials[trial_id], value if state != optuna.trial.TrialState.PRUNED
                                    else None, state=state)
            except Exception as e:                           # e.g. the study was changed by hand meanwhile
                import logging
                logging.getLogger(__name__).warning("optuna: could not record trial %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)
            # Nothing more is sent for it: the driver keeps no per-trial state past its end (Tune also pickles this
            # searcher, _ot_trials included, at every experiment checkpoint). benchmarks/search_scale.py
            self._ot_trials.pop(trial_id, None)
            self._best.pop(trial_id, None)
            self._steps.pop(trial_id, None)

    _Searcher = DrcapsOptunaSearch
    return _Searcher


_Searcher: type | None = None


def make_searcher(exp: Experiment, study_name: str, storage_url: str | None) -> Any:
    """Ray's ``OptunaSearch`` (see ``_searcher_class``) over the experiment's space: seeded sampler, enqueued
    known-good points, and the study persisted in ``storage_url`` (an RDB URL; None keeps it in memory) so Optuna
    Dashboard can open it; a SQLite one in WAL mode, search/sqlite_tuning.py)."""
    s = exp.search
    return _searcher_class()(space=to_distributions(s.space), metric=s.metric, mode=s.mode,
                             sampler=make_sampler(s.sampler, s.seed), study_name=study_name,
                             storage=tuned_optuna_storage(storage_url) if storage_url else None,
                             points_to_evaluate=[dict(p) for p in s.enqueue] or None,
                             max_epochs=exp.run.train.epochs)


def trial_dirname(trial: Any) -> str:
    """A trial's folder under the search's Ray folder: ``trial-003-<ray trial id>`` (short; the number is Optuna's)."""
    _, number = split_config(dict(trial.config))
    return f"trial-{number:03d}-{trial.trial_id}" if number is not None else f"trial-{trial.trial_id}"


def trial_run_name(number: int, params: dict[str, Any], names: list[str]) -> str:
    """``trial 3 lr=0.3 momentum=0.9 units=16``: the MLflow run name of a trial (number and searched values)."""
    return f"trial {number} {format_params(params, names)}".strip()
