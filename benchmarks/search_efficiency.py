"""Search efficiency on the bundled digits: TPE + ASHA-style early stopping vs TPE alone vs random search, at equal
budgets of trial-epochs, over several seeds.

Trials run IN-PROCESS (``drcapsnet.train`` + Optuna directly, one trial after another), not through Ray: a Ray
search per arm and seed would spend most of 2 cores on Ray's start-up and fixed costs (see trial_overhead.py). The
early stopping is Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving: the rule Ray's ASHA applies,
with the quickstart's grace period and reduction factor), the samplers are ``search.space.make_sampler``'s, and the
space, base config and max epochs are the quickstart's (``experiments/quickstart.yaml``) without its enqueued
known-good point (that would hand every arm the answer in its first trial). A trial's value is its best
``val_acc`` over its epochs, as the search ranks trials.

Reported: each arm's best val accuracy after spending 25%, 50% and 100% of the budget (mean over seeds), and the
trial-epochs each arm needed to reach random search's final best, seed by seed, as a ratio of random's own.

    python benchmarks/search_efficiency.py            # small preset, budget 60 trial-epochs, seeds 0-2
    python benchmarks/search_efficiency.py --quick    # tiny, 3 epochs, budget 12: a smoke, too small to separate arms
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("tpe+asha", "tpe", "random")


class _BudgetSpent(Exception):
    pass


def run_arm(arm: str, seed: int, preset: str, epochs: int, budget: int, experiment: str) -> list[tuple[int, float]]:
    """The arm's curve: (trial-epochs spent, best val_acc so far) after every epoch it trained."""
    import optuna
    import torch

    from drcapsnet.config import model_preset
    from drcapsnet.data import load_datasets
    from search.experiment import load_experiment
    from search.space import apply_params, make_sampler, to_distributions

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = load_experiment(experiment)
    sched = exp.search.scheduler
    data = load_datasets(exp.run.data)
    distributions = to_distributions(exp.search.space)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=sched.grace_period,
                                                     reduction_factor=int(sched.reduction_factor))
              if arm == "tpe+asha" else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", pruner=pruner,
                                sampler=make_sampler("random" if arm == "random" else "tpe", seed))
    spent, best, curve = 0, 0.0, []
    from drcapsnet.train import train

    while spent < budget:
        trial = study.ask(fixed_distributions=distributions)
        run = apply_params(exp, trial.params)
        model = dataclasses.replace(model_preset(preset), **{
            k.split(".", 1)[1]: v for k, v in trial.params.items() if k.startswith("model.")})
        cfg = dataclasses.replace(run.train, epochs=epochs, num_threads=1, device="cpu",
                                  seed=seed * 1000 + trial.number)
        trial_best = 0.0

        def report(m: dict[str, float], trial: optuna.Trial = trial) -> None:
            nonlocal spent, best, trial_best
            spent += 1
            acc = m.get("val_acc", 0.0)
            acc = acc if math.isfinite(acc) else 0.0
            trial_best, best = max(trial_best, acc), max(best, acc)
            curve.append((spent, best))
            trial.report(acc, int(m["epoch"]))
            if spent >= budget:
                raise _BudgetSpent
            if trial.should_prune():
                raise optuna.TrialPruned

        try:
            train(model, run.data, cfg, report, datasets=data)
            study.tell(trial, trial_best)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except _BudgetSpent:
            study.tell(trial, trial_best)
        except Exception:                      # a diverged trial: worthless, as in a real search
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return curve


def best_at(curve: list[tuple[int, float]], epochs: int) -> float:
    return max((b for e, b in curve if e <= epochs), default=0.0)


def epochs_to(curve: list[tuple[int, float]], target: float) -> float:
    return next((e for e, b in curve if b >= target - 1e-12), math.inf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--preset", default=None, help="model preset (default small; quick: tiny)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs per trial (default: the experiment's)")
    parser.add_argument("--budget", type=int, default=None, help="trial-epochs per arm and seed (default 60; quick 24)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="arms run in parallel processes, 1 thread each")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from drcapsnet.data import load_datasets
    from search.experiment import load_experiment

    exp = load_experiment(args.experiment)
    preset = args.preset or ("tiny" if args.quick else "small")      # the quickstart's is small
    epochs = args.epochs or (3 if args.quick else exp.run.train.epochs)
    budget = args.budget or (12 if args.quick else 60)
    seeds = [int(s) for s in args.seeds.split(",")]
    from search.space import make_sampler

    print(f"{exp.path.name}: preset {preset}, up to {epochs} epochs a trial, budget {budget} trial-epochs per arm and "
          f"seed, seeds {seeds}; in-process trials (Optuna + drcapsnet.train), ASHA = Optuna SuccessiveHalvingPruner"
          f"(min_resource={exp.search.scheduler.grace_period}, "
          f"reduction_factor={exp.search.scheduler.reduction_factor:g}); "
          f"TPE: {make_sampler('tpe', 0)._n_startup_trials} start-up trials; {args.jobs} processes x 1 thread")
    t0 = time.perf_counter()
    jobs = [(arm, seed) for seed in seeds for arm in ARMS]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_arm, job[0], job[1], preset, epochs, budget, str(exp.path)) for job in jobs}
        curves = {}
        for job, f in futures.items():
            curves[job] = f.result()
            print(f"  {job[0]} seed {job[1]}: best {curves[job][-1][1]:.4f} after {curves[job][-1][0]} trial-epochs "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"measured in {time.perf_counter() - t0:.0f} s\n")

    fractions = (0.25, 0.5, 1.0)
    print(f"{'arm':10s} " + " ".join(f"{f'best@{int(f * budget)}':>10s}" for f in fractions)
          + f" {'epochs to random best (per seed)':>34s} {'vs random (median)':>19s}")
    for arm in ARMS:
        bests = [statistics.mean(best_at(curves[(arm, s)], int(f * budget)) for s in seeds) for f in fractions]
        needed, ratios = [], []
        for s in seeds:
            target = best_at(curves[("random", s)], budget)
            e_arm, e_rand = epochs_to(curves[(arm, s)], target), epochs_to(curves[("random", s)], target)
            needed.append(e_arm)
            ratios.append(e_arm / e_rand)
        shown = ", ".join("never" if math.isinf(e) else str(int(e)) for e in needed)
        print(f"{arm:10s} " + " ".join(f"{b:10.4f}" for b in bests)
              + f" {shown:>34s} {statistics.median(ratios):18.2f}x")
    print("\nper seed, final best val_acc: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{arm} {best_at(curves[(arm, s)], budget):.4f}" for arm in ARMS) for s in seeds))
    print(f"(validation split: {len(load_datasets(exp.run.data).val)} images, so one image is "
          f"{1 / len(load_datasets(exp.run.data).val):.4f}; {os.cpu_count()} cores, shared with other jobs)")


if __name__ == "__main__":
    main()
