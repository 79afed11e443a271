"""Multi-objective search efficiency on the bundled digits (issue 18): the hypervolume a search reaches against the
trial-epochs it spends, for MO-ASHA + TPE, TPE without early stopping and random search without early stopping, over
several seeds. Objectives: ``val_acc`` (max) and ``params`` (min): the parameter count is exact and free of machine
load, so the arms compare on what the search does, not on timing noise (a latency objective would rank trials by the
load of the moment on a shared machine).

Trials run IN-PROCESS, one after another (``drcapsnet.train`` + Optuna's ask/tell), not through Ray, as
``search_efficiency.py`` does and for the same reason (Ray's fixed costs on 2 cores). The space is
``experiments/quickstart-pareto.yaml``'s without its enqueued points; the samplers are ``search.space.make_sampler``'s
(TPE multivariate, 5 start-up trials); MO-ASHA's rung rule is ``search.tune.moasha.rung_decision`` (the scheduler's
own), applied at the rungs ``grace * rf**k`` below the last epoch. A stopped trial is told PRUNED, a finished one
its (best val_acc, params), as the searcher does. A trial's point is its best ``val_acc`` so far and its params;
training is deterministic (1 thread, seed = seed x 1000 + trial number), so a trial two arms share is trained once and
replayed (a replayed epoch still counts as spent by the arm replaying it).

Hypervolume (``search.pareto``) of each arm's front after each trial-epoch, against ONE reference point per seed
(``pareto.reference_point`` of every point any arm reached on that seed), so the arms of a seed compare.

    python benchmarks/pareto_efficiency.py                    # tiny preset, 3 epochs, budget 24, seeds 0-2
    python benchmarks/pareto_efficiency.py --preset small --epochs 6 --budget 60 --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "quickstart-pareto.yaml"
PAIRS = (("val_acc", "max"), ("params", "min"))
ARMS = ("random", "tpe", "tpe+moasha")


class _Stop(Exception):
    """The trial is stopped: by MO-ASHA at a rung, or because the arm's budget is spent."""


@dataclasses.dataclass
class _Arm:
    """One arm's running state: trial-epochs spent, each trial's point so far, the curve, MO-ASHA's rungs."""

    name: str
    budget: int
    rf: float
    recorded: dict[float, list[tuple[float, ...]]]
    spent: int = 0
    points: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    curve: list[tuple[int, list[tuple[float, float]]]] = dataclasses.field(default_factory=list)

    def epoch(self, ep: int, acc: float) -> None:
        """One epoch of the current (last) trial; raises _Stop when MO-ASHA stops it or the budget is spent."""
        from search.tune.moasha import STOP, rung_decision

        self.spent += 1
        best, params = self.points[-1]
        self.points[-1] = point = (max(best, acc if math.isfinite(acc) else 0.0), params)
        self.curve.append((self.spent, list(self.points)))
        if self.spent >= self.budget:
            raise _Stop
        if self.name == "tpe+moasha" and ep in self.recorded:
            decision = rung_decision(self.recorded[ep], point, [m for _, m in PAIRS], self.rf)
            self.recorded[ep].append(point)
            if decision == STOP:
                raise _Stop


def run_seed(seed: int, preset: str, epochs: int, budget: int, limit_train: int, grace: int,
             rf: float) -> dict[str, Any]:
    """Every arm of one seed: {arm: [(spent, [points so far])]} (points as (val_acc, params))."""
    import optuna
    import torch

    from drcapsnet.config import model_preset
    from drcapsnet.data import load_datasets
    from drcapsnet.model import CapsNet, count_parameters
    from drcapsnet.train import train
    from search.experiment import load_experiment
    from search.space import apply_params, make_sampler, to_distributions
    from search.tune.moasha import rung_milestones

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = load_experiment(EXPERIMENT, [f"data.limit_train={limit_train}", f"model.preset={preset}"])
    data, space = load_datasets(exp.run.data), to_distributions(exp.search.space)
    cache: dict[str, list[float]] = {}
    out: dict[str, Any] = {}
    for name in ARMS:
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=make_sampler("random" if name == "random" else "tpe", seed))
        arm = _Arm(name, budget, rf, {m: [] for m in rung_milestones(grace, rf, epochs) if m < epochs})
        while arm.spent < budget:
            trial = study.ask(fixed_distributions=space)
            run, train_seed = apply_params(exp, trial.params), seed * 1000 + trial.number
            model = dataclasses.replace(model_preset(preset), **{
                k.split(".", 1)[1]: v for k, v in trial.params.items() if k.startswith("model.")})
            arm.points.append((0.0, float(count_parameters(CapsNet(model)))))
            key = json.dumps([train_seed, sorted(trial.params.items())], default=str)
            cfg = dataclasses.replace(run.train, epochs=epochs, num_threads=1, device="cpu", seed=train_seed)
            try:
                _play(cache, key, epochs, arm.epoch, functools.partial(train, model, run.data, cfg, datasets=data))
                study.tell(trial, list(arm.points[-1]))
            except _Stop:
                finished = len(cache.get(key, [])) >= epochs
                study.tell(trial, list(arm.points[-1]) if finished else None,
                           state=None if finished else optuna.trial.TrialState.PRUNED)
        out[name] = arm.curve
    return out


def _play(cache: dict[str, list[float]], key: str, epochs: int, on_epoch: Any, train_it: Any) -> None:
    """Feed the trial's epochs to ``on_epoch``: cached ones first, then train (the cached prefix again, not fed)."""
    seen = cache.setdefault(key, [])
    for i, acc in enumerate(list(seen), start=1):
        on_epoch(i, acc)
    if len(seen) >= epochs:
        return

    def report(m: dict[str, float]) -> None:
        ep = int(m["epoch"])
        if ep <= len(seen):
            return
        seen.append(float(m.get("val_acc", 0.0)))
        on_epoch(ep, seen[-1])

    train_it(report=report)


def hypervolumes(curves: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each arm's hypervolume after each trial-epoch, against the seed's one reference point."""
    from search import pareto

    everything = [p for curve in curves.values() for _, pts in curve for p in pts]
    reference = pareto.reference_point(pareto.minimized(everything, [m for _, m in PAIRS]))
    out = {}
    for arm, curve in curves.items():
        out[arm] = [(spent, pareto.hypervolume(pareto.minimized(pts, [m for _, m in PAIRS]), reference))
                    for spent, pts in curve]
    return out


def at(curve: list[tuple[int, float]], spent: int) -> float:
    return max((hv for s, hv in curve if s <= spent), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--limit-train", type=int, default=400)
    ap.add_argument("--grace", type=int, default=1)
    ap.add_argument("--rf", type=float, default=2.0)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    table: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in ARMS}
    for seed in [int(s) for s in args.seeds.split(",")]:
        hv = hypervolumes(run_seed(seed, args.preset, args.epochs, args.budget, args.limit_train, args.grace,
                                   args.rf))
        final_random = at(hv["random"], args.budget)
        for arm in ARMS:
            reach = next((s for s, v in hv[arm] if v >= final_random), math.inf)
            table[arm].append((at(hv[arm], args.budget // 2) / final_random, at(hv[arm], args.budget) / final_random,
                               reach))
            print(f"seed {seed} {arm:<11} HV at half {at(hv[arm], args.budget // 2):.4g}, at budget "
                  f"{at(hv[arm], args.budget):.4g}, reaches random's final at {reach} trial-epochs", flush=True)
    print(f"\n{args.preset} preset, {args.epochs} epochs, budget {args.budget} trial-epochs, limit_train "
          f"{args.limit_train}, MO-ASHA grace {args.grace} rf {args.rf}; load {load0:.1f} -> {os.getloadavg()[0]:.1f};"
          f" {time.perf_counter() - t0:.0f} s")
    print("| arm | HV at half budget / random's final | HV at budget / random's final | trial-epochs to random's "
          "final HV (per seed) |\n|---|---|---|---|")
    for arm, rows in table.items():
        print(f"| {arm} | {statistics.median(r[0] for r in rows):.3f} | {statistics.median(r[1] for r in rows):.3f} "
              f"| {', '.join(str(r[2]) for r in rows)} |")


if __name__ == "__main__":
    main()
