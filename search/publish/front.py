"""The end of a multi-objective search (issue 18): its Pareto front, ranked by the pick rule, the pick crowned, and
the front carried into MLflow and a file.

- **Values.** A trial's objective values are those of the epoch where its FIRST objective was best (the one
  ranking, search/ranking.py; ``TrialSummary.metrics``); a cost (``params``, ``flops``, ``latency_ms``) is the value
  it reported, the same at every epoch.
- **The front**: the feasible (``search.constraints``) scored trials no other such trial dominates
  (``search.pareto.pareto_front``), ranked by ``search.pick`` (``rank_front``: the knee first, or the rule's
  metric among those meeting its ``subject_to``); rank 1 is the pick. When no front trial meets ``subject_to``, the
  first of the ranking is crowned with a warning; when no trial is feasible, the best by the first objective.
- **Confirmation** (``search.confirm``, search/tune/confirm.py): the first ``top_k`` members of this ranking are
  trained again with new seeds. The members whose confirmation runs ALL finished are eligible; each one's first
  objective (the search metric, what a ``ConfirmRun`` carries) is replaced by its confirmed mean, its costs
  (``params``, ``flops``, ``latency_ms``: measured per config) keep the search's values, and the pick rule is applied
  among them (their own front, ranked as above; ties: the better rank by the search's values). A member that failed
  a confirmation run is reported, one warning each, and never crowned; when none is eligible, the pick by the
  search's values is kept with a warning. The front's ranks (``pareto-N``) stay those of the search's values, so the
  confirmed pick (``@best``) need not be ``pareto-1``; NAME.pareto.yaml adds each confirmed member's mean, std, n.
- **Hypervolume** of the front in the minimised space, against a reference point fixed from every scored trial
  (``pareto.reference_point``: the worst value of each objective plus 10% of its range), written in the metrics'
  own units on the parent run (tag ``drcaps.pareto.reference``, metric ``pareto_hypervolume``).
- **MLflow**: each front trial tagged ``drcaps.pareto_rank`` = N and its model registered as a version with alias
  ``pareto-N`` (the pick's version is the ``@best`` one; aliases ``pareto-N`` beyond this front are removed); every
  scored trial tagged ``drcaps.objectives`` (its values, JSON) so the report draws what was decided here.
- **NAME.pareto.yaml** beside NAME.best.yaml: every front config (the exact run it trained) with its values.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search import pareto, tracking
from search.tune import SearchRecords, TrialSummary, scored
from search.tune.confirm import confirmed_stats
from search.tune.objectives_run import front_order, pick_rule, trial_values, value_names

if TYPE_CHECKING:
    from search.publish import SearchResult

RANK_TAG = "drcaps.pareto_rank"
VALUES_TAG = "drcaps.objectives"


@dataclass(frozen=True)
class Front:
    """A search's Pareto front, ranked by the pick rule (rank 1 first), with its hypervolume."""

    objectives: tuple[tuple[str, str], ...]
    members: tuple[TrialSummary, ...]         # ranked, the pick first (when it meets the rule)
    values: dict[str, dict[str, float]]       # trial id -> objective (and constrained) values, every scored trial
    hypervolume: float
    reference: dict[str, float]               # the reference point in the metrics' own units
    pick: TrialSummary | None                 # None: no trial could be crowned from the front
    rule: str                                 # the pick rule as written
    infeasible: tuple[str, ...] = ()          # trial ids outside search.constraints
    model_uris: tuple[str | None, ...] = ()   # per member: models:/NAME@pareto-N


def front_of(records: SearchRecords) -> Front:
    """The front of the search's scored trials (see the module docstring)."""
    s = records.experiment.search
    pairs = tuple(s.objective_pairs)
    trials = scored(records.trials)
    rows = [trial_values(t, value_names(s)) for t in trials]
    ranked = front_order(trials, s)
    chosen = pareto.pick(rows, pairs, s.pick, s.constraints)
    points = [p for p in pareto.objective_points(rows, pairs) if all(math.isfinite(v) for v in p)]
    reference = pareto.reference_point(points) if points else ()
    hv = pareto.hypervolume(pareto.objective_points([rows[i] for i in ranked], pairs), reference) \
        if ranked and reference else 0.0
    units = pareto.minimized([reference], [m for _, m in pairs])[0] if reference else ()
    return Front(pairs, tuple(trials[i] for i in ranked), {t.trial_id: r for t, r in zip(trials, rows, strict=True)},
                 hv, {m: float(v) for (m, _), v in zip(pairs, units, strict=False)},
                 trials[chosen] if chosen is not None else None, pick_rule(s),
                 tuple(t.trial_id for t, r in zip(trials, rows, strict=True) if not pareto.feasible(r, s.constraints)))


def front_pick(records: SearchRecords) -> tuple[TrialSummary, dict[int, dict[str, float]], list[str]]:
    """``publish.pick`` for several objectives: the crowned trial, each confirmed trial's stats and what to warn
    about. Without confirmations: the pick rule's first on the front; with them: module docstring, Confirmation."""
    front = front_of(records)
    if not records.confirmations or not front.members:
        best, problems = _search_pick(records, front)
        return best, {}, problems
    numbers = sorted({c.number for c in records.confirmations})
    stats = {n: confirmed_stats(records.confirmations, n) for n in numbers}
    problems = [f"trial {n} failed {int(st['failed'])} of its confirmation runs: not crowned"
                for n, st in stats.items() if st["failed"]]
    eligible = [m for m in front.members if m.number in stats and not stats[m.number]["failed"]
                and stats[m.number]["n"]]
    s = records.experiment.search
    first = s.objective_pairs[0][0]
    rows = [{**front.values.get(m.trial_id, {}), first: stats[m.number]["mean"]} for m in eligible]
    ranked = pareto.rank_front(rows, s.objective_pairs, s.pick, s.constraints)
    chosen = pareto.pick(rows, s.objective_pairs, s.pick, s.constraints)
    if chosen is not None:
        return eligible[chosen], stats, problems
    if ranked:
        return eligible[ranked[0]], stats, [*problems, f"no confirmed front member meets search.pick {front.rule} "
                                                       f"on its confirmed {first}: crowned the first by that rule, "
                                                       f"trial {eligible[ranked[0]].number}"]
    kept, why = _search_pick(records, front)
    return kept, stats, [*problems, f"no front member finished every confirmation run (and met search.constraints "
                                    f"on its confirmed {first}): kept the pick by the search's values, trial "
                                    f"{kept.number}", *why]


def _search_pick(records: SearchRecords, front: Front) -> tuple[TrialSummary, list[str]]:
    """The pick by the search's own values: the rule's first on the front, with what to warn about."""
    if front.pick is not None:
        return front.pick, []
    if front.members:
        return front.members[0], [f"no trial of the Pareto front meets search.pick {front.rule}: crowned the "
                                  f"front's first by that rule, trial {front.members[0].number}"]
    raw = scored(records.trials)[0]
    return raw, [f"no trial meets search.constraints: no Pareto front; crowned the best by "
                 f"{records.experiment.search.metric}, trial {raw.number}"]


def record_front(records: SearchRecords, best: TrialSummary, best_uri: str | None, problems: list[str]) -> Front:
    """The front into MLflow: trial tags, ``pareto-N`` versions, the parent run's hypervolume and reference point."""
    import dataclasses

    front = front_of(records)
    uri, parent = records.tracking_uri, records.parent_run_id
    for t in scored(records.trials):
        if t.run_id:
            tags = {VALUES_TAG: json.dumps(front.values.get(t.trial_id, {}))}
            rank = next((i for i, m in enumerate(front.members, start=1) if m.trial_id == t.trial_id), None)
            tags[RANK_TAG] = str(rank) if rank else ""
            tracking.TrialLogger(uri, t.run_id).set_tags(tags)
    model_uris = _register_front(records, front, best, best_uri, problems)
    tracking.TrialLogger(uri, parent).set_tags({
        "drcaps.pareto.objectives": ",".join(f"{m}:{mode}" for m, mode in front.objectives),
        "drcaps.pareto.reference": json.dumps(front.reference), "drcaps.pareto.pick_rule": front.rule,
        "drcaps.pareto.front": ",".join(str(m.number) for m in front.members),
        "drcaps.pareto.constraints": json.dumps(records.experiment.search.constraints)})
    tracking.log_metrics(uri, parent, {"pareto_hypervolume": front.hypervolume,
                                       "pareto_front_size": float(len(front.members))})
    return dataclasses.replace(front, model_uris=tuple(model_uris))


def _register_front(records: SearchRecords, front: Front, best: TrialSummary, best_uri: str | None,
                    problems: list[str]) -> list[str | None]:
    """Each front member's model as a version with alias ``pareto-N``; stale ``pareto-N`` aliases removed."""
    uri, name = records.tracking_uri, records.experiment.registered_model
    out: list[str | None] = []
    for n, member in enumerate(front.members, start=1):
        alias = f"pareto-{n}"
        try:
            if member.run_id is not None and member.run_id == best.run_id and best_uri is not None:
                tracking.set_model_alias(uri, name, alias, tracking.model_version(uri, name, "best")["version"])
                out.append(f"models:/{name}@{alias}")
            else:
                out.append(_register_member(records, member, alias))
        except Exception as e:            # the search's results outlive a registry that fails at its very end
            problems.append(f"could not register front trial {member.number} as {name}@{alias} "
                            f"({type(e).__name__}: {e})")
            out.append(None)
    for alias in tracking.model_aliases(uri, name):
        if alias.startswith("pareto-") and alias.removeprefix("pareto-").isdigit() \
                and int(alias.removeprefix("pareto-")) > len(front.members):
            tracking.set_model_alias(uri, name, alias, None)
    return out


def _register_member(records: SearchRecords, member: TrialSummary, alias: str) -> str | None:
    """A front trial's best checkpoint (``checkpoint/best.pt``) registered as ``NAME@alias``."""
    import torch

    from drcapsnet.checkpoint import BEST, load_model
    from drcapsnet.model import CapsNetClassifier
    from search.progress import format_params

    if member.run_id is None:
        return None
    name = records.experiment.registered_model
    if (version := tracking.run_version(records.tracking_uri, name, member.run_id)) is not None:
        tracking.set_model_alias(records.tracking_uri, name, alias, version)   # --extend: its version, not a new one
        return f"models:/{name}@{alias}"
    with tempfile.TemporaryDirectory(prefix="drcaps-front-") as d:
        path = tracking.download_artifacts(records.tracking_uri, member.run_id, f"checkpoint/{BEST}", Path(d))
        capsnet, _, _ = load_model(path)
    example = torch.rand(2, capsnet.cfg.in_channels, capsnet.cfg.image_size, capsnet.cfg.image_size)
    names = [m for m, _ in records.experiment.search.objective_pairs]
    values = ", ".join(f"{k} = {v:.6g}" for k, v in trial_values(member, names).items())
    return tracking.log_and_register_model(
        records.tracking_uri, member.run_id, CapsNetClassifier(capsnet).eval(), example,
        registered_name=records.experiment.registered_model, alias=alias,
        description=f"Pareto front {alias} (trial {member.number}) of search {records.study_name}: {values}; "
                    f"{format_params(member.params)}")


def pareto_path(out: Path) -> Path:
    """``NAME.pareto.yaml`` beside the export ``NAME.best.yaml`` (or ``X.pareto.yaml`` beside any other ``X.yaml``)."""
    stem = out.name.removesuffix(".best.yaml") if out.name.endswith(".best.yaml") else out.stem
    return out.with_name(f"{stem}.pareto.yaml")


def write_front_yaml(result: SearchResult, out: Path) -> Path | None:
    """``NAME.pareto.yaml``: the front, ranked, each member's objective values, params, runs and the exact config it
    trained (``config``: model/data/train, a file ``drcaps train --config`` takes when saved alone). None: not a
    multi-objective search."""
    import yaml

    from search.experiment import to_plain
    from search.space import trial_run

    front: Front | None = getattr(result, "front", None)   # (a stand-in result without the field: none)
    if front is None:
        return None
    exp, s = result.experiment, result.experiment.search
    uris = front.model_uris or (None,) * len(front.members)
    data = {"experiment": exp.name, "study": result.study_name, "parent_run_id": result.parent_run_id,
            "objectives": [{"metric": m, "mode": mode} for m, mode in front.objectives],
            "constraints": s.constraints, "pick": s.pick, "picked_trial": result.best.number,
            "hypervolume": front.hypervolume, "reference_point": front.reference,
            "front": [{"rank": n, "trial": t.number, "picked": t.trial_id == result.best.trial_id,
                       "values": front.values.get(t.trial_id, {}), "params": t.params, "mlflow_run_id": t.run_id,
                       "model_uri": uri, "trial_id": t.trial_id,
                       "config": trial_run(exp, t.params, s.resources.cpu, s.resources.gpu).to_dict(),
                       **_confirmed(result, t)}
                      for n, (t, uri) in enumerate(zip(front.members, uris, strict=True), start=1)]}
    path = pareto_path(out)
    header = (f"# Pareto front of search {result.study_name} ({exp.name}): {len(front.members)} feasible, "
              f"non-dominated trials ranked by search.pick ({front.rule}), rank 1 first.\n# Values: each objective at "
              "the epoch where the first was best; costs as measured. The pick is in "
              f"{out.name}.\n" + ("# confirmed: the first objective's mean, std and n over new seeds "
                                  "(search.confirm); the pick is made on it.\n" if result.confirmed else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(to_plain(data), sort_keys=False, default_flow_style=None, width=120),
                    encoding="utf-8")
    return path


def _confirmed(result: SearchResult, t: TrialSummary) -> dict[str, Any]:
    """A front member's confirmation, as the export writes it (``confirmed: {metric, mean, std, n, failed}``)."""
    stats = getattr(result, "confirmed", {}).get(t.number)
    if not stats:
        return {}
    return {"confirmed": {"metric": result.experiment.search.metric, "mean": stats["mean"], "std": stats["std"],
                          "n": int(stats["n"]), "failed": int(stats["failed"])}}


def front_lines(result: SearchResult, export_path: Any) -> list[str]:
    """The summary's front: ranked by the pick rule, the pick starred, the hypervolume, the YAML."""
    from search.progress import format_value, short_name

    front: Front | None = getattr(result, "front", None)   # (a stand-in result without the field: none)
    if front is None:
        return []
    names = list(result.experiment.search.space)
    metrics = [m for m, _ in front.objectives]
    header = ["rank", "trial", *metrics, *(short_name(n) for n in names)]
    rows = [[f"{n}{'*' if t.trial_id == result.best.trial_id else ''}", str(t.number),
             *(format_value(front.values.get(t.trial_id, {}).get(m, math.nan)) for m in metrics),
             *(format_value(t.params.get(n)) for n in names)] for n, t in enumerate(front.members, start=1)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    reference = ", ".join(f"{m} {format_value(v)}" for m, v in front.reference.items())
    out = ["", f"Pareto front ({len(front.members)} of {len(result.trials)} trials: feasible, non-dominated), ranked "
               f"by search.pick {front.rule} (* = the pick):"]
    out += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]
    out.append(f"  hypervolume {front.hypervolume:.6g} (reference point {reference}); "
               f"{len(front.infeasible)} trials outside search.constraints")
    if export_path is not None:
        out.append(f"  every front config: {pareto_path(Path(export_path))}")
    return out
