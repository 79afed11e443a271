"""Search efficiency on the bundled digits: TPE + ASHA-style early stopping vs TPE alone vs random search, at equal
budgets of trial-epochs, over several seeds.

Trials run IN-PROCESS (``drcapsnet.train`` + Optuna directly, one trial after another), not through Ray: a Ray
search per arm and seed would spend most of 2 cores on Ray's start-up and fixed costs (see trial_overhead.py). The
early stopping is Optuna's ``SuccessiveHalvingPruner`` (asynchronous successive halving: the rule Ray's ASHA applies,
with the quickstart's grace period and reduction factor unless ``--arms`` names others), the samplers are
``search.space.make_sampler``'s, and the space, base config and max epochs are the quickstart's
(``experiments/quickstart.yaml``) without its enqueued known-good point (that would hand every arm the answer in its
first trial). A trial's value is its best ``val_acc`` over its epochs, as the search ranks trials.

One process per seed runs every arm of that seed. Training is deterministic on CPU with 1 thread (seed = the trial's
seed and number), so a trial the seed's arms share (TPE's random start-up trials are the random sampler's draws) is
trained once and its per-epoch ``val_acc`` replayed to the other arms; a replayed epoch still counts as a trial-epoch
spent by the arm that replays it. Budgets are in trial-epochs, never in seconds.

The validation split is small (180 images: one image = 0.0056), so "the same best" is reported three ways:
  * exact: the trial-epochs an arm needs to reach random's final best val_acc (the original measure), as a ratio of
    the trial-epochs random itself needed;
  * within one image: the trial-epochs an arm needs to come within one validation image of random's final best, as a
    ratio of the trial-epochs random itself needed to come within that image (the same tolerance for both); and the
    seeds on which the arm's best after HALF its budget is within one image of random's best after ALL of its own;
  * held-out test: the config each arm would pick (best val_acc so far) after half and after all of its budget,
    trained for the full epochs, scored on the test split (359 images) that no arm ever saw. The goal holds on test
    when an arm's pick at half its budget scores as well as random's pick at its full budget.

    python benchmarks/search_efficiency.py            # small preset, budget 60 trial-epochs, seeds 0-2
    python benchmarks/search_efficiency.py --preset tiny --epochs 4 --budget 40 --seeds 0,1,2,3,4,5 \\
        --arms random,tpe,asha:2:2,asha:1:2,asha:1:3,asha:2:3 --save /tmp/eff.json
    python benchmarks/search_efficiency.py --load /tmp/eff.json,/tmp/more.json   # the tables again, from saved runs
    python benchmarks/search_efficiency.py --quick    # tiny, 3 epochs, budget 12: a smoke, too small to separate arms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Stop(Exception):
    pass


def arm_label(arm: str) -> str:
    if arm.startswith("asha:"):
        _, grace, rf = arm.split(":")
        return f"tpe+asha g{grace} rf{rf}"
    return arm


def parse_arms(text: str, grace: int, rf: float) -> list[str]:
    """``random,tpe,asha`` (the experiment's scheduler) or ``asha:GRACE:RF`` -> arm names ``asha:G:R``."""
    arms = []
    for a in text.split(","):
        a = a.strip()
        if a == "asha":
            a = f"asha:{grace}:{int(rf)}"
        if not (a in ("random", "tpe") or (a.startswith("asha:") and len(a.split(":")) == 3)):
            raise SystemExit(f"--arms: unknown arm {a!r} (random, tpe, asha, asha:GRACE:RF)")
        arms.append(a)
    return arms


def run_seed(arms: list[str], seed: int, preset: str, epochs: int, budget: int, experiment: str) -> dict[str, Any]:
    """Every arm of one seed. Returns {arm: curve, ...} with curve = [(spent, best, trial key of best)], and the
    test accuracy of each trial key that an arm picked (``tests``), and training statistics."""
    import optuna
    import torch

    from drcapsnet.config import model_preset
    from drcapsnet.data import load_datasets
    from drcapsnet.train import train
    from search.experiment import load_experiment
    from search.space import apply_params, make_sampler, to_distributions

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exp = load_experiment(experiment)
    data = load_datasets(exp.run.data)
    distributions = to_distributions(exp.search.space)
    cache: dict[str, dict[str, Any]] = {}          # trial key -> {"val": [acc per epoch], "test", "failed", "params"}
    stats = {"trained_epochs": 0, "replayed_epochs": 0, "mismatches": 0, "t0": time.perf_counter()}

    def trial_key(params: dict[str, Any], train_seed: int) -> str:
        return json.dumps([train_seed, sorted((k, v if isinstance(v, (int, str)) else round(float(v), 12))
                                              for k, v in params.items())])

    def play(key: str, params: dict[str, Any], train_seed: int, on_epoch) -> None:
        """Feed the trial's epochs to ``on_epoch(epoch, acc)`` (which raises to stop it): cached ones first, then
        train from scratch for the rest (the cached prefix is recomputed identically and not fed twice)."""
        entry = cache.setdefault(key, {"val": [], "test": None, "failed": False, "params": params})
        for i, acc in enumerate(entry["val"], start=1):
            stats["replayed_epochs"] += 1
            on_epoch(i, acc)
        if entry["failed"]:
            raise RuntimeError("diverged (cached)")
        if len(entry["val"]) >= epochs:
            return
        run = apply_params(exp, params)
        model = dataclasses.replace(model_preset(preset), **{
            k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("model.")})
        cfg = dataclasses.replace(run.train, epochs=epochs, num_threads=1, device="cpu", seed=train_seed)

        def report(m: dict[str, float]) -> None:
            ep = int(m["epoch"])
            acc = m.get("val_acc", 0.0)
            acc = acc if math.isfinite(acc) else 0.0
            stats["trained_epochs"] += 1
            if ep <= len(entry["val"]):
                stats["mismatches"] += acc != entry["val"][ep - 1]
                return
            entry["val"].append(acc)
            if "test_acc" in m:
                entry["test"] = m["test_acc"]
            on_epoch(ep, acc)

        try:
            train(model, run.data, cfg, report, datasets=data)
        except (_Stop, optuna.TrialPruned):
            raise
        except Exception:
            entry["failed"] = True
            raise

    def test_acc(key: str) -> float:
        entry = cache[key]
        if entry["test"] is None and not entry["failed"]:
            try:
                play(key, entry["params"], json.loads(key)[0], lambda ep, acc: None)
            except Exception:
                pass
        return 0.0 if entry["test"] is None else entry["test"]

    curves: dict[str, list[tuple[int, float, str]]] = {}
    for arm in arms:
        if arm.startswith("asha:"):
            _, grace, rf = arm.split(":")
            pruner: optuna.pruners.BasePruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=int(grace), reduction_factor=int(rf))
        else:
            pruner = optuna.pruners.NopPruner()
        study = optuna.create_study(direction="maximize", pruner=pruner,
                                    sampler=make_sampler("random" if arm == "random" else "tpe", seed))
        spent, best, best_key, curve = 0, 0.0, "", []
        while spent < budget:
            trial = study.ask(fixed_distributions=distributions)
            key = trial_key(trial.params, seed * 1000 + trial.number)
            trial_best = 0.0

            def on_epoch(ep: int, acc: float, trial: optuna.Trial = trial, key: str = key, curve: list = curve) -> None:
                nonlocal spent, best, best_key, trial_best
                spent += 1
                trial_best = max(trial_best, acc)
                if acc > best:
                    best, best_key = acc, key
                curve.append((spent, best, best_key))
                trial.report(acc, ep)
                if spent >= budget:
                    raise _Stop
                if trial.should_prune():
                    raise optuna.TrialPruned

            try:
                play(key, trial.params, seed * 1000 + trial.number, on_epoch)
                study.tell(trial, trial_best)
            except optuna.TrialPruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            except _Stop:
                study.tell(trial, trial_best)
            except Exception:                      # a diverged trial: worthless, as in a real search
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        curves[arm] = curve
    picks = {pick_at(c, f) for c in curves.values() for f in (budget // 2, budget) if pick_at(c, f)}
    tests = {key: test_acc(key) for key in sorted(picks)}
    stats["wall_s"] = time.perf_counter() - stats.pop("t0")
    return {"curves": curves, "tests": tests, "stats": stats}


def best_at(curve: list, epochs: int) -> float:
    return max((c[1] for c in curve if c[0] <= epochs), default=0.0)


def pick_at(curve: list, epochs: int) -> str:
    """The trial key an arm would pick (its best val_acc) after ``epochs`` trial-epochs."""
    return next((c[2] for c in reversed(curve) if c[0] <= epochs), "")


def epochs_to(curve: list, target: float) -> float:
    return next((c[0] for c in curve if c[1] >= target - 1e-12), math.inf)


def fmt_epochs(values: list[float]) -> str:
    return ", ".join("never" if math.isinf(e) else str(int(e)) for e in values)


def median_ratio(ratios: list[float]) -> str:
    m = statistics.median(ratios)
    return "never" if math.isinf(m) else f"{m:.2f}x"


def report(results: dict[int, dict[str, Any]], arms: list[str], budget: int, n_val: int) -> None:
    seeds = sorted(results)
    one = 1.0 / n_val
    fractions = (0.25, 0.5, 1.0)
    print(f"seeds {seeds}; budget {budget} trial-epochs; one validation image = {one:.4f}\n")
    print("best val_acc after a share of the budget (mean over seeds), and the trial-epochs to random's final best,"
          " exact and within one validation image, per seed, with the median ratio to random's own trial-epochs to"
          " the same target; 'half ~ random' = seeds where the arm's best after half its budget is within one image of"
          " random's final best")
    print(f"{'arm':18s} " + " ".join(f"{f'@{int(f * budget)}':>7s}" for f in fractions)
          + f"  {'exact: epochs per seed':>28s} {'median':>7s}  {'within 1 image: per seed':>28s} {'median':>7s}"
          + f" {'half ~ random':>13s}")
    for arm in arms:
        bests = [statistics.mean(best_at(results[s]["curves"][arm], int(f * budget)) for s in seeds)
                 for f in fractions]
        exact, ratio_exact, near, ratio_near = [], [], [], []
        for s in seeds:
            rand = results[s]["curves"]["random"]
            target = best_at(rand, budget)
            e_rand = epochs_to(rand, target)
            e = epochs_to(results[s]["curves"][arm], target)
            exact.append(e)
            ratio_exact.append(e / e_rand)
            e1 = epochs_to(results[s]["curves"][arm], target - one)
            near.append(e1)
            ratio_near.append(e1 / epochs_to(rand, target - one))
        halves = sum(best_at(results[s]["curves"][arm], budget // 2)
                     >= best_at(results[s]["curves"]["random"], budget) - one - 1e-12 for s in seeds)
        print(f"{arm_label(arm):18s} " + " ".join(f"{b:7.4f}" for b in bests)
              + f"  {fmt_epochs(exact):>28s} {median_ratio(ratio_exact):>7s}  {fmt_epochs(near):>28s}"
              + f" {median_ratio(ratio_near):>7s} {f'{halves}/{len(seeds)}':>13s}")
    print("\nheld-out test accuracy of the config each arm picks (best val_acc so far), trained for the full epochs"
          " (mean over seeds; per seed at the full budget); 'half vs random' = seeds where the pick at half the"
          " budget scores >= random's pick at the full budget on test")
    print(f"{'arm':18s} {f'test@{budget // 2}':>9s} {f'test@{budget}':>9s}  {'per seed @' + str(budget):>44s}"
          f" {'half vs random':>15s}")
    for arm in arms:
        t_half = [results[s]["tests"].get(pick_at(results[s]["curves"][arm], budget // 2), 0.0) for s in seeds]
        t_full = [results[s]["tests"].get(pick_at(results[s]["curves"][arm], budget), 0.0) for s in seeds]
        t_rand = [results[s]["tests"].get(pick_at(results[s]["curves"]["random"], budget), 0.0) for s in seeds]
        wins = sum(h >= r - 1e-12 for h, r in zip(t_half, t_rand))
        print(f"{arm_label(arm):18s} {statistics.mean(t_half):9.4f} {statistics.mean(t_full):9.4f}  "
              f"{', '.join(f'{t:.4f}' for t in t_full):>44s} {f'{wins}/{len(seeds)}':>15s}")
    print("\nper seed, final best val_acc: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{arm_label(arm)} {best_at(results[s]['curves'][arm], budget):.4f}"
                                  for arm in arms) for s in seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--preset", default=None, help="model preset (default small; quick: tiny)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs per trial (default: the experiment's)")
    parser.add_argument("--budget", type=int, default=None, help="trial-epochs per arm and seed (default 60; quick 12)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default="asha,tpe,random",
                        help="comma-separated: random, tpe, asha (the experiment's scheduler), asha:GRACE:RF")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes, 1 thread each")
    parser.add_argument("--save", default=None, help="write the curves and test scores here (JSON), seed by seed")
    parser.add_argument("--load", default=None,
                        help="report saved results (comma-separated files) instead of measuring")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from drcapsnet.data import load_datasets
    from search.experiment import load_experiment
    from search.space import make_sampler

    exp = load_experiment(args.experiment)
    n_val = len(load_datasets(exp.run.data).val)
    if args.load:                      # several files: their seeds together, on the arms they all have
        saved = [json.loads(Path(f).read_text()) for f in args.load.split(",")]
        if len({d["budget"] for d in saved}) > 1:
            raise SystemExit("--load: the files were measured with different budgets")
        common = [a for a in saved[0]["arms"] if all(a in d["arms"] for d in saved)]
        results = {}
        for d in saved:
            print(d["header"])
            results.update({int(s): r for s, r in d["results"].items()})
        report(results, common, saved[0]["budget"], n_val)
        return
    sched = exp.search.scheduler
    arms = parse_arms(args.arms, sched.grace_period, sched.reduction_factor)
    if "random" not in arms:
        arms.append("random")
    arms = ["random"] + [a for a in arms if a != "random"]     # random first: its trials fill the shared cache
    preset = args.preset or ("tiny" if args.quick else "small")      # the quickstart's is small
    epochs = args.epochs or (3 if args.quick else exp.run.train.epochs)
    budget = args.budget or (12 if args.quick else 60)
    seeds = [int(s) for s in args.seeds.split(",")]
    header = (f"{exp.path.name}: preset {preset}, up to {epochs} epochs a trial, budget {budget} trial-epochs per arm "
              f"and seed, seeds {seeds}; arms {', '.join(arm_label(a) for a in arms)}; in-process trials (Optuna + "
              f"drcapsnet.train), ASHA = Optuna SuccessiveHalvingPruner; TPE: "
              f"{make_sampler('tpe', 0)._n_startup_trials} start-up trials; {args.jobs} processes x 1 thread; "
              f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    loads = [os.getloadavg()[0]]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_seed, arms, s, preset, epochs, budget, str(exp.path)): s for s in seeds}
        for f in as_completed(futures):
            s = futures[f]
            results[s] = f.result()
            loads.append(os.getloadavg()[0])
            st = results[s]["stats"]
            print(f"  seed {s}: " + ", ".join(f"{arm_label(a)} {best_at(results[s]['curves'][a], budget):.4f}"
                                             for a in arms)
                  + f" ({st['trained_epochs']} epochs trained, {st['replayed_epochs']} replayed, "
                    f"{st['mismatches']} replay mismatches; {st['wall_s']:.0f} s; at {time.perf_counter() - t0:.0f} s,"
                    f" load {loads[-1]:.1f})", flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps({"header": header, "arms": arms, "budget": budget,
                                                       "results": results}))
    print(f"measured in {time.perf_counter() - t0:.0f} s; 1-min load average at start and after each seed: "
          f"{', '.join(f'{x:.1f}' for x in loads)}\n")
    report(results, arms, budget, n_val)


if __name__ == "__main__":
    main()
