"""Confirm the winner before it is crowned (``search.confirm: {top_k, seeds, resplit}``): when the search's trials
have ended, the top-k configs by the one ranking are trained again with new seeds (model init and data order;
``resplit``: also a fresh validation split drawn from the training data), as Ray trials with the experiment's
resources, in parallel. Best-of-N on a noisy metric is biased upward (the winner's curse); the pick is made in
search/publish/ from these runs. With several objectives, the configs confirmed are the first ``top_k`` members of
the Pareto front ranked by the pick rule (search/tune/objectives_run.py ``front_order``), and the pick rule is applied
again on their confirmed values (search/publish/front.py).

Each run is an MLflow run under the search (``drcaps.role=confirm``, ``drcaps.confirms_trial``,
``drcaps.confirm_seed``). The Optuna study records each confirmed trial's mean, spread and count as a study user
attribute ``confirm.<number>`` = ``{metric: {mean, std, n, failed}}``, never as new trials, so the sampler is not
biased by duplicates.

The confirmation's Tune folder is ``<storage>/<experiment>/<study>-confirm``: a Ctrl-C saves it, and ``--resume``
restores it, so finished runs are not run again and a run cut short continues from its last epoch in its own MLflow
run.
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import TYPE_CHECKING, Any

from search import ranking, tracking
from search.storage import confirm_attr, tuned_optuna_storage
from search.tune import lean, runtime
from search.tune.objectives_run import front_order, pick_rule
from search.tune.results import ConfirmRun, TrialSummary, scored
from search.tune.searcher import TRIAL_NUMBER
from search.tune.trial import CONFIRM_SEED, FAILURE_KEY, TrialContext, run_trial

if TYPE_CHECKING:
    from drcapsnet.data import Datasets
    from search.experiment.schema import SearchConfig
    from search.tune.lifecycle import OpenSearch

POINT = "point"   # the one config key of a confirmation trial: the searched params, the trial number, the seed


def run_confirmation(config: dict[str, Any], ctx: TrialContext, datasets: Datasets | None = None) -> None:
    """A confirmation trial: the search trial's params with another seed (search/tune/trial.py, role confirm)."""
    run_trial(dict(config[POINT]), ctx, datasets)


def candidates(trials: list[TrialSummary], search: SearchConfig, top_k: int) -> list[TrialSummary]:
    """The trials to confirm, best first: the top ``top_k`` by the one ranking; with several objectives, the first
    ``top_k`` members of the Pareto front ranked by ``search.pick`` (fewer when the front is smaller)."""
    ranked = scored(trials)
    if search.multi_objective:
        ranked = [ranked[i] for i in front_order(ranked, search)]
    return ranked[:top_k]


def confirmation_points(chosen: list[TrialSummary], seeds: int) -> list[dict[str, Any]]:
    """One point per (chosen trial, seed index 1..seeds), in the order of ``chosen``."""
    return [{**t.params, TRIAL_NUMBER: t.number, CONFIRM_SEED: seed} for t in chosen for seed in range(1, seeds + 1)]


def starting_line(search: SearchConfig, chosen: list[TrialSummary], runs: int, done: int) -> str:
    """The line printed when confirmation starts: what is confirmed, how often, what was done before."""
    c = search.confirm
    assert c is not None
    if search.multi_objective:
        what = (f"the first {len(chosen)} Pareto front members by search.pick ({pick_rule(search)})"
                + (f" (the front has only {len(chosen)}; search.confirm.top_k is {c.top_k})"
                   if len(chosen) < c.top_k else ""))
    else:
        what = f"the top {len(chosen)} trials"
    return (f"confirming {what} with {c.seeds} new seeds each ({runs} runs"
            f"{', fresh validation splits' if c.resplit else ''}{f'; {done} done before' if done else ''})")


def confirm(search: OpenSearch, trials: list[TrialSummary], datasets: Datasets | None,
            verbose: int) -> tuple[ConfirmRun, ...]:
    """Run (or, after an interrupt, finish) the confirmation of the top-k trials; raises KeyboardInterrupt when a
    Ctrl-C stopped it (its state saved for ``--resume``)."""
    from ray import tune

    exp, c = search.exp, search.exp.search.confirm
    assert c is not None
    s = exp.search
    chosen = candidates(trials, s, c.top_k)
    wanted = confirmation_points(chosen, c.seeds)
    done = {key: run for key, run in finished_runs(search.uri, search.parent_run_id, s.metric, s.mode).items()
            if key in {(p[TRIAL_NUMBER], p[CONFIRM_SEED]) for p in wanted}}     # an extension reuses these
    points = [p for p in wanted if (p[TRIAL_NUMBER], p[CONFIRM_SEED]) not in done]
    if not points:
        return tuple(sorted(done.values(), key=lambda r: (r.number, r.seed)))
    ctx = TrialContext(exp, search.uri, exp.mlflow_experiment, search.parent_run_id, s.resources.cpu,
                       s.resources.gpu, resplit=c.resplit)
    trainable = tune.with_resources(tune.with_parameters(run_confirmation, ctx=ctx, datasets=datasets),
                                    {"cpu": s.resources.cpu, "gpu": s.resources.gpu})
    folder = search.plan.folder / f"{search.folder.name}-confirm"
    if verbose >= 1:
        print(starting_line(s, chosen, len(points), len(done)), flush=True)
    if folder.is_dir() and (folder / "tuner.pkl").exists():
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={POINT: tune.grid_search(points)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=_dirname),
            run_config=tune.RunConfig(
                name=folder.name, storage_path=str(folder.parent), verbose=0 if verbose < 2 else 2,
                callbacks=lean.lean_callbacks(), failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    import ray

    tune_catches = not ray.util.client.ray.is_connected()
    with runtime.tune_interrupt_watch(tune_catches) as interrupted:
        results = tuner.fit()
    if interrupted():
        raise KeyboardInterrupt
    runs = _collect(results, s.metric, s.mode)
    _close_runs(search.uri, search.parent_run_id, runs)
    runs = tuple(sorted(({**done, **{(r.number, r.seed): r for r in runs}}).values(), key=lambda r: (r.number, r.seed)))
    record_in_study(search.storage_url, search.study_name, s.metric, runs)
    return runs


def finished_runs(uri: str, parent_run_id: str, metric: str, mode: str) -> dict[tuple[int, int], ConfirmRun]:
    """The search's FINISHED confirmation runs in MLflow, by (trial number, seed index): what an extension (or a
    resume) need not run again. Their value: the best of ``metric`` at any epoch (search/ranking.py)."""
    out = {}
    for r in tracking.child_runs(uri, parent_run_id, role="confirm"):
        found = ranking.best_epoch(tracking.metric_history(uri, r.run_id, metric), mode)
        if r.status == "FINISHED" and found is not None and r.tags.get("drcaps.confirms_trial", "").isdigit():
            key = (int(r.tags["drcaps.confirms_trial"]), int(r.tags.get("drcaps.confirm_seed", "0")))
            out[key] = ConfirmRun(*key, found[1], "finished", r.run_id)
    return out


def _dirname(trial: Any) -> str:
    point = trial.config.get(POINT, {})
    return f"confirm-{point.get(TRIAL_NUMBER, 'x')}-seed{point.get(CONFIRM_SEED, 'x')}-{trial.trial_id}"


def _collect(results: Any, metric: str, mode: str) -> tuple[ConfirmRun, ...]:
    out = []
    for r in results:
        point, last = (r.config or {}).get(POINT, {}), r.metrics or {}
        df = r.metrics_dataframe
        found = ranking.best_epoch(zip(df["epoch"], df[metric], strict=True), mode) \
            if df is not None and metric in df and "epoch" in df else None
        failed = bool(r.error) or bool(last.get(FAILURE_KEY)) or found is None
        run_id = last.get("mlflow_run_id") if isinstance(last.get("mlflow_run_id"), str) else None
        error = str(last.get(FAILURE_KEY) or r.error or "") or None
        out.append(ConfirmRun(int(point[TRIAL_NUMBER]), int(point[CONFIRM_SEED]),
                              math.nan if failed else found[1], "failed" if failed else "finished", run_id,
                              error))
    return tuple(sorted(out, key=lambda c: (c.number, c.seed)))


def _close_runs(uri: str, parent_run_id: str, runs: tuple[ConfirmRun, ...]) -> None:
    """A confirmation run left RUNNING (its worker killed) ends with its outcome; one Ray restarted anew and no
    longer owns ends KILLED."""
    owned = {c.run_id: c for c in runs if c.run_id}
    for r in tracking.child_runs(uri, parent_run_id, role="confirm"):
        c = owned.get(r.run_id)
        if c is not None and (r.status == "RUNNING" or r.tags.get("drcaps.outcome") != c.outcome):
            tracking.end_run(uri, r.run_id, "FINISHED" if c.outcome == "finished" else "FAILED",
                             {"drcaps.outcome": c.outcome})
        elif c is None and r.status == "RUNNING":
            tracking.end_run(uri, r.run_id, "KILLED", {"drcaps.outcome": "interrupted"})


def confirmed_stats(runs: tuple[ConfirmRun, ...] | list[ConfirmRun], number: int) -> dict[str, float]:
    """``{mean, std, n, failed}`` of one trial's confirmation runs (std: sample standard deviation, 0 for n=1)."""
    values = [c.value for c in runs if c.number == number and c.outcome == "finished" and math.isfinite(c.value)]
    failed = sum(c.number == number and c.outcome != "finished" for c in runs)
    return {"mean": statistics.fmean(values) if values else math.nan,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values), "failed": failed}


def record_in_study(storage_url: str, study_name: str, metric: str, runs: tuple[ConfirmRun, ...]) -> None:
    """Each confirmed trial's mean, spread and count on the Optuna study (``confirm.<number>``), not as trials."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=tuned_optuna_storage(storage_url))
        for number in sorted({c.number for c in runs}):
            study.set_user_attr(confirm_attr(number), {metric: confirmed_stats(runs, number)})
    except Exception as e:                       # the MLflow records stand; say what was not written
        warnings.warn(f"could not record the confirmation on Optuna study {study_name!r}: {e}", stacklevel=2)

