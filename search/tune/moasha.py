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

Ray Tune's scheduler seam only: ``FIFOScheduler`` and its public hooks (``on_trial_add``, ``on_trial_result``,
``on_trial_complete``, ``on_trial_remove``, ``choose_trial_to_run`` inherited, ``debug_string``, ``save``/
``restore``). Ray is imported here, as everywhere in ``search/tune/``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
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


class MOASHAScheduler(FIFOScheduler):
    """MO-ASHA over ``objectives`` (``(metric, mode)`` pairs); see the module docstring for the rule.

    Tune's own ``metric``/``mode`` (``tune.TuneConfig``) may name the first objective or be left out; another
    metric is refused as Tune refuses it for a scheduler made with its own metric."""

    def __init__(self, objectives: Sequence[tuple[str, str]], *, grace_period: int = 1,
                 reduction_factor: float = 2.0, max_t: int = 100, time_attr: str = "training_iteration") -> None:
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
        rungs = " | ".join(f"t={m:g}: {len(r)} recorded" for m, r in self.rungs.items())
        names = ", ".join(f"{metric} ({mode})" for metric, mode in self.objectives)
        return f"Using MO-ASHA over {names}: num_stopped={self.num_stopped}\nRungs: {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
