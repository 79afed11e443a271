"""How often is the search's raw winner not the confirmed best, and how optimistic is its value (issue 16)?

For each search seed: N configs from the quickstart's space (Optuna's seeded TPE sampler, as a search proposes them,
told each value), each trained once with the experiment's seed (the search); the top-k by validation accuracy
trained again on S new seeds (drcaps' confirmation: ``search.space.trial_run`` with ``confirm_seed``); the pick by
``search.publish.pick``, the function a search crowns with. Printed per seed and over all seeds: whether the raw
top-1 is the confirmed pick, the optimism (raw best value minus its confirmed mean, in points), the held-out test
accuracy of the raw pick vs the confirmed pick (each config's test accuracy from its search training), and the
confirmation's cost as a share of the trial-epochs.

Trainings run in this process (no Ray, no MLflow): the statistics of best-of-N do not depend on the scheduler, and
a real search per seed would cost minutes each on 2 cores. ASHA is left out (every trial runs all epochs).

Set-ups (``--setup``), both with the quickstart's search space and SGD:

- ``quickstart``: the quickstart as it is (bundled digits, 180 validation images), on ``--preset`` (default tiny).
- ``mnist5k``: the ``small`` preset on the real MNIST test set (IDX, ``--data-dir``), split by ``drcapsnet.data``
  7,000 train / 1,000 validation / 2,000 test, training cut to ``--limit-train`` images (stratified, default
  5,000); ``train.lr_decay`` 0.9 (the recipe of docs/benchmarks.md "Accuracy on real MNIST, small preset, CPU").

    python benchmarks/confirm_winner.py --seeds 8 --trials 8 --epochs 4 --top-k 3 --confirm-seeds 2
    python benchmarks/confirm_winner.py --setup mnist5k --seeds 8 --trials 6 --epochs 2 --top-k 3 --confirm-seeds 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from drcapsnet.data import Datasets, load_datasets
from drcapsnet.train import train
from search import ranking
from search.experiment import Experiment, load_experiment
from search.publish import pick
from search.space import make_sampler, to_distributions, trial_run
from search.tune import ConfirmRun, SearchRecords, TrialSummary

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"quickstart": "tiny", "mnist5k": "small"}   # --preset's default per --setup


def setup_overrides(setup: str, data_dir: Path, limit_train: int) -> list[str]:
    """The overrides of experiments/quickstart.yaml that make ``setup`` (the preset and epochs come separately)."""
    if setup == "quickstart":
        return []
    return ["data.dataset=idx", f"data.data_dir={data_dir.resolve()}", f"data.limit_train={limit_train}",
            "train.lr_decay=0.9"]


def _train(exp: Experiment, params: dict, confirm_seed: int | None, data: Datasets) -> tuple[float, float]:
    run = trial_run(exp, params, 1, 0, confirm_seed=confirm_seed)
    seen: list[dict[str, float]] = []
    last = train(run.model, run.data, run.train, seen.append, datasets=data)
    best = ranking.best_epoch([(int(m["epoch"]), m["val_acc"]) for m in seen], "max")
    return (best[1] if best else math.nan), last.get("test_acc", math.nan)


def one_search(exp: Experiment, seed: int, n: int, top_k: int, seeds: int, data: Datasets) -> dict[str, float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(exp.search.sampler, seed))
    dists = to_distributions(exp.search.space)
    trials, tests = [], {}
    for i in range(n):
        t = study.ask(dists)
        value, test = _train(exp, t.params, None, data)
        study.tell(t, value if math.isfinite(value) else None,
                   state=None if math.isfinite(value) else optuna.trial.TrialState.FAIL)
        trials.append(TrialSummary(str(i), dict(t.params), value, exp.run.train.epochs,
                                   "finished" if math.isfinite(value) else "failed", number=i))
        tests[i] = test
    ranked = ranking.rank(trials, lambda t: t.metric if t.outcome == "finished" else None, "max")
    confirmations = tuple(ConfirmRun(t.number, s, v, "finished" if math.isfinite(v) else "failed")
                          for t in ranked[:top_k] for s in range(1, seeds + 1)
                          for v in [_train(exp, t.params, s, data)[0]])
    records = SearchRecords(exp, ranked, "", "", "", "", "", confirmations)
    best, stats, _ = pick(records)
    raw = ranked[0]
    return {"changed": float(best.number != raw.number),
            "optimism": 100 * (raw.metric - stats[raw.number]["mean"]) if raw.number in stats else math.nan,
            "raw_test": tests[raw.number], "picked_test": tests[best.number],
            "cost": len(confirmations) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", type=Path, default=REPO / "experiments/quickstart.yaml")
    p.add_argument("--setup", choices=sorted(PRESETS), default="quickstart")
    p.add_argument("--preset", help="model preset (default: tiny for quickstart, small for mnist5k)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/mnist-test", help="mnist5k: IDX folder")
    p.add_argument("--limit-train", type=int, default=5000, help="mnist5k: training images")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--confirm-seeds", type=int, default=2)
    a = p.parse_args()
    preset = a.preset or PRESETS[a.setup]
    exp = load_experiment(a.experiment, [f"train.epochs={a.epochs}", f"model.preset={preset}",
                                         "search.scheduler.name=none",
                                         *setup_overrides(a.setup, a.data_dir, a.limit_train)])
    data = load_datasets(exp.run.data)
    rows, t0 = [], time.perf_counter()
    print(f"{a.experiment.name}, set-up {a.setup}: preset {preset}, {a.trials} trials x {a.epochs} epochs, top "
          f"{a.top_k} confirmed on {a.confirm_seeds} seeds; train/val/test {len(data.train)}/{len(data.val)}/"
          f"{len(data.test)} images")
    for seed in range(a.seeds):
        r = one_search(exp, seed, a.trials, a.top_k, a.confirm_seeds, data)
        rows.append(r)
        print(f"seed {seed}: raw top-1 confirmed: {'no ' if r['changed'] else 'yes'}  optimism {r['optimism']:+.2f} "
              f"points  test raw {100 * r['raw_test']:.2f}%  confirmed pick {100 * r['picked_test']:.2f}%  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows if math.isfinite(r[key]))

    print(f"over {a.seeds} seeds: raw top-1 not the confirmed best in {sum(r['changed'] for r in rows):.0f}; mean "
          f"optimism {mean('optimism'):+.2f} points; test accuracy raw pick {100 * mean('raw_test'):.2f}% vs "
          f"confirmed pick {100 * mean('picked_test'):.2f}%; confirmation cost {100 * mean('cost'):.0f}% of the "
          f"trial-epochs; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
