"""Does TPE still learn from trials the scheduler stopped, now that they reach Optuna as PRUNED?

Before issue 8, Ray's OptunaSearch told Optuna every stopped trial as COMPLETE with its LAST value (an early,
low accuracy, as if the configuration had been trained in full); drcaps now tells it PRUNED with every epoch's
intermediate value (``search/tune/study_searcher.py``: ``StudySearcher``). This benchmark runs both ways side by side,
on the same seeds, with the sampler drcaps builds (``search.space.make_sampler("tpe")``) and ASHA-like stopping
(Optuna's SuccessiveHalvingPruner, grace 1 epoch, reduction factor 2, as the quickstart), over SYNTHETIC learning curves
shaped like the quickstart's (accuracy rises with epochs at a rate set by lr and momentum, peaks at one lr, and
noise), so that hundreds of searches take seconds. It reports the mean best accuracy found after N trials and the
trial-epochs spent.

    python benchmarks/pruned_feedback.py            # 20 seeds x 30 trials
    python benchmarks/pruned_feedback.py --quick    # 6 seeds x 20 trials
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import optuna

from search.space import make_sampler

EPOCHS = 6


def curve(lr: float, momentum: float, epoch: int, noise: float) -> float:
    """Validation accuracy after ``epoch`` epochs: best near lr 0.3 / momentum 0.9, slow for small steps."""
    quality = math.exp(-(math.log10(lr / 0.3) ** 2) / 0.18) * (0.6 + 0.4 * math.exp(-((momentum - 0.9) / 0.25) ** 2))
    speed = 0.15 + 1.5 * lr * (1 / (1.05 - momentum)) / 10
    return max(0.0, min(1.0, 0.1 + 0.88 * quality * (1 - math.exp(-speed * epoch)) + noise))


def search(seed: int, trials: int, stopped_as: str) -> tuple[float, int]:
    """One search; ``stopped_as``: 'pruned' (drcaps now) or 'complete-last' (before). Returns (best, trial-epochs)."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))
    noise_rng = __import__("random").Random(seed)
    spent, best = 0, 0.0
    for _ in range(trials):
        trial = study.ask()
        lr = trial.suggest_float("train.lr", 0.03, 0.6, log=True)
        momentum = trial.suggest_float("train.momentum", 0.5, 0.95)
        values = []
        for epoch in range(1, EPOCHS + 1):
            values.append(curve(lr, momentum, epoch, noise_rng.gauss(0, 0.01)))
            spent += 1
            trial.report(values[-1], epoch)
            if epoch < EPOCHS and trial.should_prune():
                break
        best = max(best, max(values))
        if len(values) < EPOCHS and stopped_as == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif len(values) < EPOCHS:
            study.tell(trial, values[-1])                     # Ray's OptunaSearch: COMPLETE with the last value
        else:
            study.tell(trial, max(values))                    # drcaps' value: the best epoch
    return best, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 seeds x 20 trials")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--trials", type=int)
    args = parser.parse_args()
    seeds = args.seeds or (6 if args.quick else 20)
    trials = args.trials or (20 if args.quick else 30)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    print(f"synthetic quickstart-like curves, {seeds} seeds x {trials} trials x up to {EPOCHS} epochs, TPE "
          "(search.space.make_sampler) + SuccessiveHalvingPruner")
    results = {}
    for mode in ("complete-last", "pruned"):
        runs = [search(seed, trials, mode) for seed in range(seeds)]
        best = [b for b, _ in runs]
        results[mode] = (statistics.mean(best), statistics.stdev(best), statistics.mean(s for _, s in runs))
        print(f"  stopped trials told as {mode:<14} best acc {results[mode][0]:.4f} +- {results[mode][1]:.4f}   "
              f"trial-epochs {results[mode][2]:.1f}")
    gap = results["pruned"][0] - results["complete-last"][0]
    print(f"pruned - complete-last: {gap:+.4f} best accuracy   ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
