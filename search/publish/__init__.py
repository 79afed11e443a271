"""After a search (the plan's run, search/tune/): crown the best trial, register it, record the outcome on the parent
run, write the report, export the best config and every trial, and print the summary. One owner for the end of a
search; the confirmation (search/tune/confirm.py) feeds the pick here.

"Best" (docs/notes.md): without ``search.confirm``, the trial with the best value of the search metric at any epoch
(search/ranking.py). With it, among the top-k trials whose confirmation runs all finished, the best MEAN over those
runs (ties: the better search value, then the earlier trial); a config that failed or diverged in confirmation is
reported and never crowned. With several objectives: the pick rule on the Pareto front, applied with confirmation
to the confirmed front members' values (search/publish/front.py ``front_pick``).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drcapsnet.config import RunConfig
from search import earlier, ranking, tracking
from search.plan import SearchPlan
from search.space import trial_run
from search.tune import ConfirmRun, SearchRecords, TrialSummary, scored
from search.tune.confirm import confirmed_stats


@dataclass(frozen=True)
class SearchResult:
    """A finished search in plain Python: export and the CLI never see a Ray object."""

    experiment: Any                   # search.experiment.Experiment, as it ran
    best: TrialSummary                # the crowned trial (the confirmed pick where the search confirms)
    trials: list[TrialSummary]        # ranked by the search's values
    best_config: RunConfig            # exactly what the best trial trained (threads and device included)
    tracking_uri: str
    parent_run_id: str
    best_run_id: str | None
    model_uri: str | None
    study_name: str
    storage_url: str
    experiment_path: str
    problems: tuple[str, ...] = ()    # what failed at the very end (registration, report) without losing the search
    report_path: str | None = None    # the search's HTML report (search/report/), also on its parent run
    raw_best: TrialSummary | None = None      # the search's own best (differs from ``best`` after confirmation)
    confirmations: tuple[ConfirmRun, ...] = ()
    confirmed: dict[int, dict[str, float]] = field(default_factory=dict)   # trial number -> mean, std, n, failed
    taken: tuple[earlier.TakenTrial, ...] = ()   # copied by a warm start: shown, never crowned (docs/notes.md)
    front: Any = None                 # several objectives: the Pareto front (search/publish/front.py ``Front``)


def pick(records: SearchRecords) -> tuple[TrialSummary, dict[int, dict[str, float]], list[str]]:
    """The crowned trial, each confirmed trial's stats, and what to warn about (configs that failed confirmation)."""
    if records.experiment.search.multi_objective:        # the pick rule on the Pareto front
        from search.publish.front import front_pick

        return front_pick(records)
    ranked = scored(records.trials)
    raw = ranked[0]
    if not records.confirmations:
        return raw, {}, []
    numbers = sorted({c.number for c in records.confirmations})
    stats = {n: confirmed_stats(records.confirmations, n) for n in numbers}
    problems = [f"trial {n} failed {int(s['failed'])} of its confirmation runs: not crowned"
                for n, s in stats.items() if s["failed"]]
    eligible = [t for t in ranked if t.number in stats and not stats[t.number]["failed"] and stats[t.number]["n"]]
    best = ranking.best_of(eligible, lambda t: stats[t.number]["mean"], records.experiment.search.mode)
    if best is None:
        problems.append("no confirmed config finished every confirmation run: the search's raw best is kept")
        return raw, stats, problems
    return best, stats, problems


def publish(plan: SearchPlan, records: SearchRecords) -> SearchResult:
    """After the run: pick, register ``@best``, the parent run's outcome and the report (the export and the summary:
    ``outputs.write_outputs``)."""
    from search.publish import outputs

    exp, s = plan.experiment, plan.experiment.search
    best, stats, problems = pick(records)
    model_uri = _register(records, best, problems)
    from search.publish.front import record_front

    front = record_front(records, best, model_uri, problems) if s.multi_objective else None
    counts = {o: sum(t.outcome == o for t in records.trials) for o in ("finished", "stopped_early", "failed")}
    metrics = {f"best_{s.metric}": best.metric, "trials_finished": counts["finished"],
               "trials_stopped_early": counts["stopped_early"], "trials_failed": counts["failed"],
               "trial_epochs": sum(t.epochs for t in records.trials),
               "confirm_runs": len(records.confirmations),
               "confirm_epochs": len(records.confirmations) * exp.run.train.epochs,
               "wall_time_s": tracking.run_age_s(records.tracking_uri, records.parent_run_id)}
    if best.number in stats:
        metrics |= {f"confirmed_{s.metric}_mean": stats[best.number]["mean"],
                    f"confirmed_{s.metric}_std": stats[best.number]["std"],
                    "confirmed_n": stats[best.number]["n"]}
    from search.tune.extend import round_of

    rounds = round_of(Path(records.folder).name)          # --extend: the outcome again, one step on
    tracking.log_metrics(records.tracking_uri, records.parent_run_id,
                         {k: v for k, v in metrics.items() if math.isfinite(float(v))}, step=rounds)
    # The search's own pick before confirmation: its best trial, or with several objectives the front's pick.
    raw = (front.pick or front.members[0]) if front is not None and front.members else scored(records.trials)[0]
    tracking.end_run(records.tracking_uri, records.parent_run_id, "FINISHED", {
        **{f"drcaps.best.{k}": str(v) for k, v in best.params.items()},
        "drcaps.best_trial_id": best.trial_id, "drcaps.best_run_id": best.run_id or "",
        "drcaps.best_trial": str(best.number), "drcaps.raw_best_trial": str(raw.number),
        "drcaps.confirmed": "true" if stats else "false",
        f"drcaps.best_{s.metric}": f"{best.metric:.6f}", "drcaps.model_uri": model_uri or "",
        "drcaps.extensions": str(rounds), "drcaps.trials": str(len(records.trials))}
        | ({"drcaps.registration_error": error} if (error := next(
            (p for p in problems if p.startswith("could not register")), None)) else {}))
    result = SearchResult(
        exp, best, records.trials, trial_run(exp, best.params, s.resources.cpu, s.resources.gpu),
        records.tracking_uri, records.parent_run_id, best.run_id, model_uri, records.study_name,
        records.storage_url, records.folder, raw_best=raw, confirmations=records.confirmations, confirmed=stats,
        taken=tuple(earlier.taken_trials(records.storage_url, records.study_name)), front=front)
    report = outputs.write_report(result, problems)
    return outputs.with_report(result, report, problems)


def _register(records: SearchRecords, best: TrialSummary, problems: list[str]) -> str | None:
    """The crowned trial's best checkpoint (its MLflow artifact ``checkpoint/best.pt``) registered as ``@best``."""
    import torch

    from drcapsnet.checkpoint import BEST, load_model
    from drcapsnet.model import CapsNetClassifier

    exp, s = records.experiment, records.experiment.search
    if best.run_id is None:
        return None
    registered = exp.registered_model
    if _crowned_already(records.tracking_uri, registered, best.run_id):   # --extend kept the winner: no new version
        return f"models:/{registered}@best"
    try:                  # the search's results must outlive a registry that fails now, at its very end
        with tempfile.TemporaryDirectory(prefix="drcaps-best-") as d:
            path = tracking.download_artifacts(records.tracking_uri, best.run_id, f"checkpoint/{BEST}", Path(d))
            capsnet, _, _ = load_model(path)
        example = torch.rand(2, capsnet.cfg.in_channels, capsnet.cfg.image_size, capsnet.cfg.image_size)
        from search.progress import format_params

        return tracking.log_and_register_model(
            records.tracking_uri, best.run_id, CapsNetClassifier(capsnet).eval(), example, registered_name=registered,
            description=f"Best trial (trial {best.number}, {best.trial_id}) of search {records.study_name}: "
                        f"{s.metric} = {best.metric:.4f} at its best epoch; {format_params(best.params)}")
    except Exception as e:
        problems.append(f"could not register the best model as {registered!r} ({type(e).__name__}: {e}); its "
                        f"checkpoint is artifact checkpoint/best.pt of MLflow run {best.run_id}")
        return None


def _crowned_already(uri: str, registered: str, run_id: str) -> bool:
    """Whether ``registered@best`` already holds the checkpoint of run ``run_id``."""
    try:
        return tracking.model_version(uri, registered, "best")["run_id"] == run_id
    except tracking.TrackingError:               # no such model or alias yet
        return False
