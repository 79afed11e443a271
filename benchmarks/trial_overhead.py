"""Where a search trial's time goes: a real quickstart search on the CPU, broken down per trial and for the search.

Runs ``drcaps search experiments/quickstart.yaml`` (real embedded Ray, Optuna with SQLite, MLflow with a SQLite store,
all in a temporary folder) and reads back what every trial recorded: the ``perf_*_s`` counters that
``search.tune.run_trial`` logs to its MLflow run at its end (start-up: from the worker
process's start, or the previous trial's end in a reused actor, to the trial function; data; training; evaluation;
checkpointing; MLflow writes; Tune's report hand-off; teardown: the end of the run, the best checkpoint's upload,
clean-up). Then the search as a whole: wall time, Ray's start, and the share of the slots' time (wall x concurrent
trials) spent outside training.

    python benchmarks/trial_overhead.py            # the shipped quickstart
    python benchmarks/trial_overhead.py --quick    # 4 trials x 2 epochs (< 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("startup", "data", "train", "eval", "ckpt", "mlflow", "tune", "teardown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "quickstart.yaml"))
    parser.add_argument("--trials", type=int, default=None, help="override search.num_samples")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--quick", action="store_true", help="4 trials x 2 epochs")
    args = parser.parse_args()
    trials, epochs = (args.trials or 4, args.epochs or 2) if args.quick else (args.trials, args.epochs)

    t_import = time.perf_counter()
    import ray

    from search import tracking
    from search.experiment import load_experiment
    from search.plan import make_plan
    from search.publish import publish
    from search.tune import run_search
    t_import = time.perf_counter() - t_import

    exp = load_experiment(args.experiment)
    if trials:
        exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, num_samples=trials))
    if epochs:
        exp = dataclasses.replace(exp, run=dataclasses.replace(
            exp.run, train=dataclasses.replace(exp.run.train, epochs=epochs)),
            search=dataclasses.replace(exp.search, scheduler=dataclasses.replace(
                exp.search.scheduler, grace_period=min(exp.search.scheduler.grace_period, epochs))))
    s = exp.search
    with tempfile.TemporaryDirectory(prefix="drcaps-overhead-") as tmp:
        os.chdir(tmp)
        uri = f"sqlite:///{tmp}/mlflow.db"
        t1, wall1 = time.perf_counter(), time.time()   # Ray's start included: the wall a user waits
        plan = make_plan(exp, tracking_uri=uri, storage_path=Path(tmp) / "ray", out=Path(tmp) / "best.yaml")
        result = publish(plan, run_search(plan, verbose=0))
        t_search, wall2 = time.perf_counter() - t1, time.time()
        ray.shutdown()
        runs = tracking.child_runs(uri, result.parent_run_id)
        # The driver's side, from the trial runs' MLflow start and end times: before the first trial started, after
        # the last one ended (registration of the best model, the report), and the slots' idle time between.
        starts = [r.start_time / 1000 for r in runs if r.start_time]
        ends = [r.end_time / 1000 for r in runs if r.end_time]
        t_before = min(starts) - wall1 if starts else float("nan")
        t_after = wall2 - max(ends) if ends else float("nan")
        idle = idle_slot_seconds([(r.start_time / 1000, r.end_time / 1000) for r in runs
                                  if r.start_time and r.end_time], exp.search.max_concurrent)
        per_trial = []
        for r in runs:
            m = {p: r.metrics.get(f"perf_{p}_s") for p in PHASES} | {
                "wall": r.metrics.get("perf_wall_s"), "worker_trials": r.metrics.get("perf_worker_trials")}
            if all(v is not None for v in m.values()):
                per_trial.append(m)

    n = len(result.trials)
    epochs_run = sum(t.epochs for t in result.trials)
    print(f"{exp.name}: {n} trials ({epochs_run} trial-epochs, {exp.run.train.epochs} max), {s.max_concurrent} at "
          f"a time on {os.cpu_count()} cores; best {s.metric} {result.best.metric:.4f}")
    print(f"imports (ray, search) {t_import:.1f} s, search {t_search:.1f} s (run_search: Ray's start, the stores, "
          f"the MLflow parent run, Tune, registration of the best model, the report)")
    if not per_trial:
        print("no perf_* metrics in the trials' MLflow runs (a version of search.tune without the counters)")
        return
    print(f"\nper trial, {len(per_trial)} trials with counters (seconds; mean, min, max):")
    print(f"  {'phase':10s} {'mean':>7s} {'min':>7s} {'max':>7s} {'total':>8s}")
    for p in (*PHASES, "wall"):
        vals = [t[p] for t in per_trial]
        print(f"  {p:10s} {statistics.mean(vals):7.2f} {min(vals):7.2f} {max(vals):7.2f} {sum(vals):8.1f}")
    reused = sum(t["worker_trials"] > 1 for t in per_trial)
    fixed = [t["wall"] - t["train"] - t["eval"] for t in per_trial]
    fixed_first = [f for f, t in zip(fixed, per_trial) if t["worker_trials"] == 1]
    fixed_reused = [f for f, t in zip(fixed, per_trial) if t["worker_trials"] > 1]
    train_total = sum(t["train"] for t in per_trial)
    eval_total = sum(t["eval"] for t in per_trial)
    slots = s.max_concurrent * t_search
    print(f"\n  trials in a reused actor: {reused} of {len(per_trial)}")
    print(f"  fixed cost per trial (wall - train - eval): mean {statistics.mean(fixed):.2f} s; "
          f"in a fresh worker {statistics.mean(fixed_first) if fixed_first else float('nan'):.2f} s, "
          f"in a reused one {statistics.mean(fixed_reused) if fixed_reused else float('nan'):.2f} s")
    print(f"  driver: {t_before:.1f} s before the first trial's MLflow run (Ray's start, the stores, the "
          f"parent run, Tune's start, the first worker), {t_after:.1f} s after the last trial's run ended (its end, "
          f"Optuna closed, best model registered, report written) = "
          f"{(t_before + t_after) * s.max_concurrent / slots:.0%} of the slots' time")
    print(f"  slots idle between the first trial's start and the last one's end: {idle:.1f} slot-s = "
          f"{idle / slots:.0%} of the slots' time (a slot waiting for its next trial, or with none left at the end)")
    print(f"  search: slots x wall = {s.max_concurrent} x {t_search:.1f} s = {slots:.1f} s; "
          f"training {train_total:.1f} s = {train_total / slots:.0%}; outside training {1 - train_total / slots:.0%}; "
          f"outside training and evaluation {1 - (train_total + eval_total) / slots:.0%} "
          f"(evaluation {eval_total / slots:.0%}; the rest: fixed costs, Ray's scheduling, "
          f"the registration, and slots idle at the end)")


def idle_slot_seconds(spans: list[tuple[float, float]], slots: int) -> float:
    """Slot-seconds with no trial run open, from the first run's start to the last one's end."""
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    idle, running, last = 0.0, 0, None
    for t, delta in events:
        if last is not None:
            idle += max(0, slots - running) * (t - last)
        running, last = running + delta, t
    return idle


if __name__ == "__main__":
    main()
