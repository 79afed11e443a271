"""A search that builds on an earlier one, on Ray's side: ``--extend N`` (the same study and parent run, a new Tune
folder ``<study>-extend-<k>`` beside the first, the earlier folders' results read back so the ranking covers every
trial) and ``search.warm_start`` (the earlier study's trials that fit, copied into the new study before the first
suggestion: search/warm_start.py chooses, ``StudySearcher.add_trials`` copies).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any

from search import tracking
from search.experiment import experiment_to_dict
from search.plan import SearchPlan
from search.state import STATE_FILE
from search.storage import tuned_optuna_storage
from search.tune.searcher import make_searcher
from search.warm_start import OldTrial, Selection, select

if TYPE_CHECKING:
    from search.tune.lifecycle import OpenSearch

EXTEND = "-extend-"               # <study>-extend-<k>: the Tune folder of the k-th extension
SEED_STRIDE = 7919                # an extension's sampler seed: search.seed + k x this (a prime), not the first's


def extension(plan: SearchPlan) -> tuple[str, str, str]:
    """``(study name, parent run id, Tune folder name)`` of the next extension of the plan's finished search; its
    parent run is RUNNING again."""
    assert plan.extends is not None
    saved = json.loads((plan.folder / STATE_FILE).read_text())
    study = plan.extends.study_name
    assert saved["study_name"] == study, (saved, study)
    rounds = [int(m.group(1)) for p in plan.folder.iterdir()
              if (m := re.fullmatch(re.escape(study + EXTEND) + r"(\d+)", p.name))]
    tracking.reopen_run(plan.tracking_uri, plan.extends.parent_run_id)
    return study, plan.extends.parent_run_id, f"{study}{EXTEND}{max(rounds, default=0) + 1}"


def round_of(tune_name: str) -> int:
    """0 for a search's first Tune folder, k for its k-th extension."""
    head, sep, tail = tune_name.rpartition(EXTEND)
    return int(tail) if sep and tail.isdigit() else 0


def earlier_results(search: OpenSearch) -> list[Any]:
    """Ray's results of the search's other Tune folders (the first, the earlier extensions), oldest first."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    folders = [search.plan.folder / search.study_name] + sorted(
        (p for p in search.plan.folder.glob(f"{search.study_name}{EXTEND}*") if p.is_dir()),
        key=lambda p: round_of(p.name))
    return [r for folder in folders if folder != search.folder and folder.is_dir()
            for r in ResultGrid(ExperimentAnalysis(str(folder)))]


def searcher(search: OpenSearch) -> Any:
    """drcaps' searcher for this Tune folder: an extension's sampler seeded apart (a seeded random sampler would
    propose the first search's points again); a warm-started search's study seeded with the earlier trials (an
    enqueued point one of them ran already is not enqueued again)."""
    exp, k = search.exp, round_of(search.folder.name)
    if k:
        exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, seed=exp.search.seed + k * SEED_STRIDE))
    copies, chosen = _taken(search) if search.plan.warm_start is not None else ([], None)
    if copies:
        ran = [t.params for t in copies]
        exp = dataclasses.replace(exp, search=dataclasses.replace(
            exp.search, enqueue=tuple(p for p in exp.search.enqueue if dict(p) not in ran)))
    made = make_searcher(exp, search.study_name, search.storage_url)
    if chosen is not None:
        _add(search, made, copies, chosen)
    return made


def _taken(search: OpenSearch) -> tuple[list[Any], Selection]:
    """The earlier study's trials that fit (copies, their params in the new space) and the selection."""
    import optuna

    source = search.plan.warm_start
    assert source is not None
    old = optuna.load_study(study_name=source.study_name, storage=tuned_optuna_storage(source.storage_url))
    trials = old.get_trials(deepcopy=False)
    chosen = select([OldTrial(t.number, t.state.name, dict(t.params)) for t in trials], source.settings,
                    experiment_to_dict(search.exp))
    copies = []
    for t in trials:
        if t.number in chosen.taken:
            t = copy.deepcopy(t)
            t.params = chosen.taken[t.number]
            copies.append(t)
    return copies, chosen


def _add(search: OpenSearch, made: Any, copies: list[Any], chosen: Selection) -> int:
    """Copy the chosen trials into the new study (values and per-epoch values kept, before the first suggestion),
    print one line (taken, and by reason not taken), tag the parent run. Returns how many were taken."""
    source = search.plan.warm_start
    assert source is not None
    added = made.add_trials(copies, source.study_name)
    if added < len(copies):
        chosen.skipped["refused by Optuna"] += len(copies) - added
        chosen = dataclasses.replace(chosen, taken=dict(list(chosen.taken.items())[:added]))
    print(chosen.line(f"{source.experiment} ({source.study_name})"), flush=True)
    tracking.TrialLogger(search.uri, search.parent_run_id).set_tags({
        "drcaps.warm_start": f"{source.experiment}: {source.study_name}", "drcaps.warm_start_taken": str(added)})
    return added
