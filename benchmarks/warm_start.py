"""Warm start (issue 17): a 10-trial search of the quickstart's model and space seeded with an earlier search's
trials vs the same search started cold, over several seeds.

For each seed s: a cold search (TPE seeded s, the quickstart's ASHA rule as Optuna's ``SuccessiveHalvingPruner``,
grace 2, reduction factor 2, 10 trials of at most 6 epochs), then a warm one: the same, its study first given the
COMPLETE and PRUNED trials of the cold search of seed s+1 (another, independent earlier search of the same space:
what ``search.warm_start`` copies, with their values and per-epoch values, chosen by search/warm_start.py) before
its first suggestion. Reported per seed: the best val_acc each reaches with its own 10 trials (taken trials are never
crowned), and the trial-epochs each spends before its running best first reaches the cold search's final best
("-": never). Taken trials cost no trial-epochs (they are not retrained).

Trials run IN-PROCESS (``drcapsnet.train`` + Optuna ask/tell, one after another, 1 thread), not through Ray, as
search_efficiency.py does: a Ray search per arm and seed would spend most of 2 cores on Ray's fixed costs. Budgets
are trial-epochs, never seconds.

    python benchmarks/warm_start.py                     # seeds 0,1,2
    python benchmarks/warm_start.py --seeds 0,1 --trials 10 --save /tmp/warm.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_search(exp: Any, data: Any, seed: int, trials: int, taken: list[Any]) -> dict[str, Any]:
    """One search of ``trials`` new trials; ``taken``: earlier FrozenTrials added first. Returns its trials (for a
    later warm start) and its curve ``[(trial-epochs spent, running best of its own trials)]``."""
    import optuna

    from drcapsnet.train import train
    from search.space import apply_params, make_sampler, to_distributions

    distributions = to_distributions(exp.search.space)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=2))
    for t in taken:
        study.add_trial(optuna.trial.create_trial(state=t.state, value=t.value if t.values else None,
                                                  params=t.params, distributions=distributions,
                                                  intermediate_values=t.intermediate_values))
    spent, best, curve = 0, 0.0, []
    for _ in range(trials):
        trial = study.ask(fixed_distributions=distributions)
        run = apply_params(exp, trial.params)
        cfg = dataclasses.replace(run.train, num_threads=1, device="cpu", seed=seed * 1000 + trial.number)
        trial_best = 0.0

        def report(m: dict[str, float], trial: Any = trial) -> None:
            nonlocal spent, best, trial_best
            acc = m.get("val_acc", 0.0)
            acc = acc if math.isfinite(acc) else 0.0
            spent += 1
            trial_best, best = max(trial_best, acc), max(best, acc)
            curve.append((spent, best))
            trial.report(acc, int(m["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned

        try:
            train(run.model, run.data, cfg, report, datasets=data)
            study.tell(trial, trial_best)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except Exception:                          # diverged: worthless, as in a real search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return {"trials": [copy.deepcopy(t) for t in study.trials], "curve": curve, "best": best, "spent": spent}


def epochs_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((spent for spent, best in curve if best >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()

    import optuna
    import torch

    from drcapsnet.data import load_datasets
    from search.experiment import experiment_to_dict, load_experiment
    from search.warm_start import OldTrial, select

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = load_experiment(args.experiment)
    data = load_datasets(exp.run.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    cold = {s: run_search(exp, data, s, args.trials, []) for s in seeds}
    rows = []
    for i, s in enumerate(seeds):
        source = cold[seeds[(i + 1) % len(seeds)]]["trials"]
        raw = experiment_to_dict(exp)
        chosen = select([OldTrial(t.number, t.state.name, t.params) for t in source], raw, raw)
        taken = [t for t in source if t.number in chosen.taken]
        warm = run_search(exp, data, s, args.trials, taken)
        target = cold[s]["best"]
        rows.append({"seed": s, "taken": len(taken), "cold_best": target, "warm_best": warm["best"],
                     "cold_epochs_to_cold_best": epochs_to(cold[s]["curve"], target),
                     "warm_epochs_to_cold_best": epochs_to(warm["curve"], target),
                     "cold_spent": cold[s]["spent"], "warm_spent": warm["spent"]})
        print(json.dumps(rows[-1]), flush=True)
    wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    print(f"\n{exp.name}: {args.trials} trials x <= {exp.run.train.epochs} epochs, TPE + SHA(2, 2), 1 thread; "
          f"wall {wall:.0f} s, load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs")
    print("seed  taken  cold best  warm best  cold: epochs to its best  warm: epochs to the cold best  "
          "spent cold  spent warm")
    for r in rows:
        def shown(v: int | None) -> str:
            return "-" if v is None else str(v)
        print(f"{r['seed']:>4}  {r['taken']:>5}  {r['cold_best']:>9.4f}  {r['warm_best']:>9.4f}  "
              f"{shown(r['cold_epochs_to_cold_best']):>24}  {shown(r['warm_epochs_to_cold_best']):>29}  "
              f"{r['cold_spent']:>10}  {r['warm_spent']:>10}")
    if args.save:
        args.save.write_text(json.dumps({"rows": rows, "wall_s": wall, "load": [load0, load1]}, indent=2))


if __name__ == "__main__":
    main()
