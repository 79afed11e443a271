"""What proposes the trials: drcaps' Optuna searcher (``make_searcher``; the class is in study_searcher.py, loaded
only when a searcher is built, since it imports Ray), the Tune scheduler that stops weak trials, and the names a trial
carries (its Optuna number, its failure key, its folder, its MLflow run name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from search.experiment import Experiment
from search.progress import format_params
from search.space import make_sampler, to_distributions
from search.warm_start import rungs_line


def make_scheduler(exp: Experiment, max_t: int, taken: Sequence[Mapping[int, Sequence[float]] | None] = ()) -> Any:
    """The Tune scheduler of ``search.scheduler`` over ``max_t`` epochs (ASHA, median stopping, or none).

    ``taken``: a warm start's taken trials, each ``{epoch: one value per objective}`` or None (search/earlier.py
    ``taken_curves``). With ASHA, the values they recorded at its rungs start the rungs (MO-ASHA's ``prior``, one
    objective included: Ray's ASHA starts its rungs empty and has no public way to fill them), and one line says how
    many did. A search without them keeps Ray's ``AsyncHyperBandScheduler`` (one objective)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    sched, grace = exp.search.scheduler, min(exp.search.scheduler.grace_period, max_t)
    prior = _asha_prior(exp, max_t, taken) if sched.name == "asha" and taken else None
    if sched.name == "asha" and (exp.search.multi_objective or prior):   # several objectives, or a warm start
        from search.tune.moasha import MOASHAScheduler

        return MOASHAScheduler(exp.search.objective_pairs, grace_period=grace,
                               reduction_factor=sched.reduction_factor, max_t=max_t, prior=prior)
    if sched.name == "asha":
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                                       reduction_factor=sched.reduction_factor)
    if sched.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=sched.grace_period,
                                  min_samples_required=3)
    return FIFOScheduler()


def _asha_prior(exp: Experiment, max_t: int,
                taken: Sequence[Mapping[int, Sequence[float]] | None]) -> dict[float, list[tuple[float, ...]]] | None:
    """The taken trials' values at the rungs (search/tune/moasha.py ``rung_prior``), None when none reached one;
    prints how many start the rungs."""
    from search.tune.moasha import rung_milestones, rung_prior

    sched = exp.search.scheduler
    milestones = rung_milestones(min(sched.grace_period, max_t), sched.reduction_factor, max_t)
    curves = [c for c in taken if c]
    prior = rung_prior(curves, milestones)
    informed = sum(max(c) >= milestones[0] for c in curves)
    name = "MO-ASHA" if exp.search.multi_objective else "ASHA"
    print(rungs_line(name, informed, len(taken), {m: len(v) for m, v in prior.items()}), flush=True)
    return prior if informed else None


TRIAL_NUMBER = "drcaps_trial"   # config key carrying the Optuna trial number to the trial (not a searched field)
FAILURE_KEY = "drcaps_failure"  # in a trial's last report: why it failed without raising (e.g. diverged at epoch E)


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A Ray trial's config -> (the searched params, the Optuna trial number)."""
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER}
    number = config.get(TRIAL_NUMBER)
    return params, int(number) if number is not None else None


def make_searcher(exp: Experiment, study_name: str, storage_url: str | None) -> Any:
    """drcaps' searcher (search/tune/study_searcher.py: a Ray Tune ``Searcher`` on Optuna's public ask/tell) over
    the experiment's space: seeded sampler, the ``search.enqueue`` points first, the study persisted in
    ``storage_url`` (an RDB URL, opened through search/storage.py; None keeps it in memory) so Optuna Dashboard can
    open it."""
    from search.tune.study_searcher import StudySearcher

    s = exp.search
    metrics, modes = [m for m, _ in s.objective_pairs], [mode for _, mode in s.objective_pairs]
    return StudySearcher(to_distributions(s.space), metric=metrics if s.multi_objective else s.metric,
                         mode=modes if s.multi_objective else s.mode, sampler=_sampler(exp),
                         study_name=study_name, storage_url=storage_url, enqueue=s.enqueue,
                         max_epochs=exp.run.train.epochs, number_key=TRIAL_NUMBER, failure_key=FAILURE_KEY,
                         keep=[c for c in s.constraints if c not in metrics])


def nsga2_population(num_samples: int) -> int:
    """NSGA-II's population for a budget of ``num_samples`` trials: about three generations, 4 to 50 (Optuna's)."""
    return min(50, max(4, num_samples // 3))


def _sampler(exp: Experiment) -> Any:
    """The seeded sampler; with ``search.constraints``, Optuna's ``constraints_func`` over them."""
    from search.tune.objectives_run import StudyConstraints

    s = exp.search
    honour = StudyConstraints(s.constraints, [m for m, _ in s.objective_pairs]) if s.constraints else None
    return make_sampler(s.sampler, s.seed, constraints_func=honour, population_size=nsga2_population(s.num_samples))


def trial_dirname(trial: Any) -> str:
    """A trial's folder under the search's Ray folder: ``trial-003-<ray trial id>`` (short; the number is Optuna's)."""
    _, number = split_config(dict(trial.config))
    return f"trial-{number:03d}-{trial.trial_id}" if number is not None else f"trial-{trial.trial_id}"


def trial_run_name(number: int, params: dict[str, Any], names: list[str]) -> str:
    """``trial 3 lr=0.3 momentum=0.9 units=16``: the MLflow run name of a trial (number and searched values)."""
    return f"trial {number} {format_params(params, names)}".strip()
