"""MO-ASHA: asynchronous successive halving whose rung decision ranks trials over SEVERAL objectives.

ASHA (Li et al. 2020, https://arxiv.org/abs/1810.05934) stops a trial at a rung when its one metric falls below the
top ``1/reduction_factor`` of the values recorded at that rung. MO-ASHA (Schmucker et al. 2021, "Multi-objective
multi-fidelity hyperparameter optimization with application to fairness"; Syne Tune's ``MOASHA``) ranks the trials
recorded at the rung by non-dominated sorting, crowding distance breaking ties within a front (NSGA-II's order,
``search.pareto.nsga2_order``), and keeps the top ``1/reduction_factor`` of that ranking.

The rule, as :func:`rung_decision` (pure, tested on a hand-made table): when a trial reaches a rung, its objective
vector joins the vectors recorded there; with ``n`` recorded (itself included) it continues when its 0-based place in
the ranking is below ``n / reduction_factor`` (it is among the first ``ceil(n / reduction_factor)``), else it stops.
The first trial at a rung always continues. A tie in the ranking (same front, same crowding distance) goes to the
newcomer, as Ray's ASHA keeps a value equal to its cutoff; among the earlier trials, the earlier one ranks first.
Ray's ASHA cuts at a percentile of the earlier values; Syne Tune keeps places ``<= n / reduction_factor`` (both
trials of the first pair at rf 2, say): this keeps the top share, rounded up.

Which values: the objectives "known at that rung", i.e. each objective's latest value reported at or before the
result that reaches the rung. Cost objectives (``params``, ``flops``, ``latency_ms``) may be reported once, at the
first epoch, and stay known; accuracy is the rung epoch's. A trial reaching a milestone with an objective still
unknown is not recorded there and goes on (as Ray's ASHA does for a result without its metric); it is judged at the
first later result where every objective is known. NaN counts as the worst value.

Rungs (as Ray's ASHA, one bracket): ``grace_period * reduction_factor**k`` for ``k = 0, 1, ...`` up to ``max_t``; a
trial is stopped at ``max_t`` (and recorded there when it completes, for the trials that come after).
``time_attr`` is ``training_iteration`` (one per epoch here).

A prior (``prior``, a warm start's taken trials, search/tune/searcher.py ``make_scheduler``): values recorded at each
rung before any new trial, in arrival order, so a new trial is judged against them from its first rung (Ray's ASHA
starts with empty rungs). :func:`rung_prior` records a finished curve as the trials above are recorded: each epoch at
the highest rung it reaches, once per rung, so a taken trial stopped before a rung is not recorded there.

With ONE objective the rule is ASHA's "keep the top ``ceil(n / reduction_factor)``" (the NSGA-II order of one value
is its rank; a NaN is last). Ray's ``AsyncHyperBandScheduler`` cuts differently: a trial continues when its value is
at least the ``(1 - 1/reduction_factor)`` percentile (linearly interpolated, NaN ignored) of the EARLIER values only,
and a NaN continues. Near the cutoff they differ both ways: earlier (1, 2), rf 2, new 1.4: Ray stops it (cutoff 1.5),
this keeps it (2nd of 3); earlier (0, 6), rf 3, new 5: Ray keeps it (cutoff 4), this stops it (2nd of 3, 1 kept).
Ray's ASHA stays the scheduler of a one-objective search without a warm start (docs/notes.md).

Ray Tune's scheduler seam only: ``FIFOScheduler`` and its public hooks (``on_trial_add``, ``on_trial_result``,
``on_trial_complete``, ``on_trial_remove``, ``choose_trial_to_run`` inherited, ``debug_string``, ``save``/
``restore``). Ray is imported here, as everywhere in ``search/tune/``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from search.pareto import minimized, nsga2_order

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def rung_milestones(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """The rungs' milestones, ascending: ``grace_period * reduction_factor**k`` up to ``max_t`` (Ray's ASHA with one
    bracket: ``int(log(max_t / grace_period) / log(reduction_factor) + 1)`` rungs)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor ** k for k in range(count)]


def rung_decision(recorded: Sequence[Sequence[float]], new: Sequence[float], modes: Sequence[str],
                  reduction_factor: float) -> str:
    """``CONTINUE`` or ``STOP`` for a trial reaching a rung with objective values ``new``, where ``recorded`` holds
    the values of the trials recorded there before it, in arrival order (``modes``: ``max``/``min`` per objective).
    The trial continues when its place in the NSGA-II order of all ``n`` vectors is below ``n / reduction_factor``."""
    table = minimized([new, *recorded], modes)                 # index 0: ties in the order go to the newcomer
    place = nsga2_order(table).index(0)
    return CONTINUE if place < len(table) / reduction_factor else STOP


def rung_prior(curves: Iterable[Mapping[int, Sequence[float]]],
               milestones: Sequence[float]) -> dict[float, list[tuple[float, ...]]]:
    """``{milestone: [objective vectors]}``: finished trials' ``curves`` (``{epoch: one value per objective}``) as the
    scheduler would have recorded them, in the curves' order: each epoch, ascending, at the highest milestone it
    reaches, when the trial is not recorded there yet (a gap in a curve is judged at the next epoch, as a live trial
    that jumps a rung is). A curve that ends before a milestone is not recorded there."""
    prior: dict[float, list[tuple[float, ...]]] = {m: [] for m in milestones}
    for curve in curves:
        done: set[float] = set()
        for epoch in sorted(curve):
            reached = [m for m in milestones if epoch >= m]
            if reached and reached[-1] not in done:
                done.add(reached[-1])
                prior[reached[-1]].append(tuple(float(v) for v in curve[epoch]))
    return prior


class MOASHAScheduler(FIFOScheduler):
    """MO-ASHA over ``objectives`` (``(metric, mode)`` pairs); see the module docstring for the rule.

    Tune's own ``metric``/``mode`` (``tune.TuneConfig``) may name the first objective or be left out; another
    metric is refused as Tune refuses it for a scheduler made with its own metric. ``prior``: ``{milestone: [one
    value per objective, ...]}`` recorded at the rungs before any trial (:func:`rung_prior` builds it); it is part of
    the scheduler's state, so Tune's pickle and ``save``/``restore`` keep it."""

    def __init__(self, objectives: Sequence[tuple[str, str]], *, grace_period: int = 1,
                 reduction_factor: float = 2.0, max_t: int = 100, time_attr: str = "training_iteration",
                 prior: Mapping[float, Sequence[Sequence[float]]] | None = None) -> None:
        if not objectives or any(mode not in ("max", "min") for _, mode in objectives):
            raise ValueError(f"objectives must be (metric, 'max'|'min') pairs, got {list(objectives)!r}")
        if not (grace_period >= 1 and reduction_factor > 1 and max_t >= grace_period):
            raise ValueError(f"need grace_period >= 1, reduction_factor > 1, max_t >= grace_period; got "
                             f"{grace_period}, {reduction_factor}, {max_t}")
        super().__init__()
        self.objectives = tuple((str(m), str(mode)) for m, mode in objectives)
        self.reduction_factor = float(reduction_factor)
        self.max_t = max_t
        self.time_attr = time_attr
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self.rungs: dict[float, dict[str, tuple[float, ...]]] = {m: {} for m in self.milestones}   # trial -> values
        self._known: dict[str, dict[str, float]] = {}         # trial id -> latest value of each objective
        self.num_stopped = 0
        self.prior_sizes = self._add_prior(prior or {})      # milestone -> how many prior values start it

    def _add_prior(self, prior: Mapping[float, Sequence[Sequence[float]]]) -> dict[float, int]:
        """Record ``prior`` at its rungs first, under ids no Ray trial has (``prior/<milestone>/<i>``)."""
        if unknown := sorted(set(prior) - set(self.milestones)):
            raise ValueError(f"prior: {unknown} are not rungs; the rungs are {self.milestones}")
        for milestone, vectors in prior.items():
            for i, vector in enumerate(vectors):
                if len(vector) != len(self.objectives):
                    raise ValueError(f"prior: {list(vector)!r} at rung {milestone:g} has {len(vector)} values, "
                                     f"expected one per objective ({len(self.objectives)})")
                self.rungs[milestone][f"prior/{milestone:g}/{i}"] = tuple(float(v) for v in vector)
        return {m: len(self.rungs[m]) for m in self.milestones}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Accept Tune's metric/mode only when they are the first objective's (or absent)."""
        first_metric, first_mode = self.objectives[0]
        return metric in (None, first_metric) and mode in (None, first_mode)

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        self._known.setdefault(trial.trial_id, {})

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]) -> str:
        return self._on_result(trial.trial_id, result)

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]) -> None:
        if result:
            self._on_result(trial.trial_id, result, final=True)     # recorded where it got to: later trials compare
        self._known.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._known.pop(trial.trial_id, None)

    def _on_result(self, trial_id: str, result: Mapping[str, Any], final: bool = False) -> str:
        known = self._known.setdefault(trial_id, {})
        for metric, _ in self.objectives:
            value = result.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                known[metric] = float(value)
        now = result.get(self.time_attr)
        if not isinstance(now, (int, float)):
            return CONTINUE
        if now >= self.max_t and not final:
            return STOP
        reached = [m for m in self.milestones if now >= m]
        if not reached or trial_id in self.rungs[reached[-1]] or len(known) < len(self.objectives):
            return CONTINUE                                  # decided at this rung already, or not yet judgeable
        recorded = self.rungs[reached[-1]]
        values = tuple(known[metric] for metric, _ in self.objectives)
        action = rung_decision(list(recorded.values()), values, [mode for _, mode in self.objectives],
                               self.reduction_factor)
        recorded[trial_id] = values
        if action == STOP and not final:
            self.num_stopped += 1
        return action

    def debug_string(self) -> str:
        prior = getattr(self, "prior_sizes", {})             # a scheduler pickled before the prior existed has none
        rungs = " | ".join(f"t={m:g}: {len(r)} recorded" + (f" ({prior[m]} prior)" if prior.get(m) else "")
                           for m, r in self.rungs.items())
        names = ", ".join(f"{metric} ({mode})" for metric, mode in self.objectives)
        return f"Using MO-ASHA over {names}: num_stopped={self.num_stopped}\nRungs: {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
