"""What a multi-objective search needs while it runs (issue 18): the costs a trial measures and reports with every
epoch (:class:`TrialCosts`), the constraints Optuna's sampler checks (:class:`StudyConstraints`), and the front's
ranking by the pick rule (:func:`front_order`), which both the confirmation (search/tune/confirm.py: the members it
trains again) and the publish step (search/publish/front.py: the front, its ranks and pick) read.

Costs (``search.measured_costs``: the cost metrics the objectives, constraints or pick name), measured once per
trial attempt, at its first report, on the trial's own device and thread count (``train`` has set them up by then):

- ``params`` and ``flops`` (``drcapsnet/cost.py``: forward FLOPs per image, ``torch.utils.flop_counter``);
- ``latency_ms``: MEASURED, median of ``LATENCY_REPEATS`` timed forward passes of a batch of ``LATENCY_BATCH``
  random images after ``LATENCY_WARMUP`` untimed ones, divided by the batch, in the precision the trial evaluates
  with (``train.bf16``). The device's name and these settings go to the trial's MLflow run as tags
  (``drcaps.latency_device``, ``_batch``, ``_repeats``, ``_warmup``, ``_precision``, ``_threads``);
- ``train_s_per_epoch``: the epoch's own wall time (``epoch_s``: training and evaluation), each epoch.

They are added to EVERY epoch's report (so MO-ASHA knows them from the first rung, and a restored trial's reports
carry them too) and logged with the epoch's metrics to MLflow. The model timed is a fresh ``CapsNet`` of the trial's
config, not the one training: its architecture is what costs, not its weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from search import pareto
from search.experiment.objectives import MODEL_COSTS

if TYPE_CHECKING:
    from search.experiment.schema import SearchConfig
    from search.tune.results import TrialSummary

LATENCY_BATCH = 32     # images per timed pass: a serving batch; per-image latency = median pass / 32
LATENCY_REPEATS = 20   # timed passes (the median of them is taken)
LATENCY_WARMUP = 5     # untimed passes first (allocator, caches, cuDNN's algorithm choice)
COST_ATTR = "cost.{}"  # the Optuna trial user attr holding a constrained metric that is not an objective


class TrialCosts:
    """The cost metrics ``wanted`` of one trial attempt, measured at its first report, then added to each report."""

    def __init__(self, wanted: Sequence[str], run: Any) -> None:
        self.wanted = tuple(wanted)
        self.run = run                                  # drcapsnet.config.RunConfig: what the trial trains
        self.measured: dict[str, float] = {}
        self.settings: dict[str, str] = {}             # how latency_ms was measured (MLflow tags of the trial)

    def add(self, metrics: Mapping[str, float], logger: Any = None) -> dict[str, float]:
        """``metrics`` with the wanted costs added (measured on the first call; ``logger``: a TrialLogger that
        records how latency was measured, once)."""
        out = dict(metrics)
        if any(c in MODEL_COSTS for c in self.wanted) and not self.measured:
            self.measured = self._measure()
            if logger is not None and self.settings:
                logger.set_tags({f"drcaps.{k}": v for k, v in self.settings.items()})
        out.update(self.measured)
        if "train_s_per_epoch" in self.wanted and "epoch_s" in metrics:
            out["train_s_per_epoch"] = float(metrics["epoch_s"])
        return out

    def _measure(self) -> dict[str, float]:
        import torch

        from drcapsnet.cost import model_cost
        from drcapsnet.train import resolve_device

        train = self.run.train
        cost = model_cost(self.run.model, resolve_device(train.device), batch=LATENCY_BATCH,
                          repeats=LATENCY_REPEATS if "latency_ms" in self.wanted else 1,
                          warmup=LATENCY_WARMUP if "latency_ms" in self.wanted else 0, bf16=train.bf16)
        if "latency_ms" in self.wanted:
            self.settings = {k: str(v) for k, v in cost.items() if k.startswith("latency_") and k != "latency_ms"}
            self.settings["latency_threads"] = str(torch.get_num_threads())
        return {k: float(cost[k]) for k in MODEL_COSTS if k in self.wanted}


class StudyConstraints:
    """Optuna's ``constraints_func`` for ``search.constraints`` (a value <= 0 per bound is feasible:
    ``pareto.constraint_values``). A trial's metrics: its objective values (what was told), and for a constrained
    metric that is not an objective, the latest value the searcher kept in the user attr ``cost.<metric>``.
    A class, not a closure: the sampler is pickled with the searcher (Tune's experiment state)."""

    def __init__(self, constraints: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> None:
        self.constraints = {k: dict(v) for k, v in constraints.items()}
        self.metrics = tuple(metrics)

    def __call__(self, trial: Any) -> list[float]:
        values: dict[str, float] = {}
        for name in self.constraints:
            if (v := trial.user_attrs.get(COST_ATTR.format(name))) is not None:
                values[name] = v
        if trial.values is not None:
            values.update({m: v for m, v in zip(self.metrics, trial.values, strict=False)})
        return [c if math.isfinite(c) else 1e300 for c in pareto.constraint_values(values, self.constraints)]


def value_names(search: SearchConfig) -> list[str]:
    """The metrics a trial is judged by on the front: the objectives, then the constrained metrics."""
    return list(dict.fromkeys([m for m, _ in search.objective_pairs] + list(search.constraints)))


def trial_values(t: TrialSummary, names: Sequence[str]) -> dict[str, float]:
    """The trial's value of each metric in ``names`` (those it reported; its values at the epoch where its first
    objective was best, ``TrialSummary.metrics``)."""
    return {n: float(t.metrics[n]) for n in names if n in t.metrics and math.isfinite(float(t.metrics[n]))}


def pick_rule(search: SearchConfig) -> str:
    """``search.pick`` as written in lines, tags and files: ``knee``, or the rule's mapping as JSON."""
    return search.pick if isinstance(search.pick, str) else json.dumps(search.pick)


def front_order(trials: Sequence[TrialSummary], search: SearchConfig) -> list[int]:
    """Indices of the ``trials`` (scored ones) on their Pareto front, ranked by ``search.pick`` (rank 1 first:
    ``pareto.rank_front``)."""
    rows = [trial_values(t, value_names(search)) for t in trials]
    return pareto.rank_front(rows, search.objective_pairs, search.pick, search.constraints)
