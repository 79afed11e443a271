"""A simulated search of many trials: does the driver, the Optuna storage or MLflow slow down or lose data as a search
grows?

The real search machinery (Ray Tune with ``reuse_actors``, drcaps' Optuna searcher over an RDB storage, ASHA, a
ConcurrencyLimiter, one MLflow child run per trial written through ``search.tracking``) drives trials that train
nothing: each reports a synthetic learning curve (a saturating curve whose ceiling depends on lr and momentum, plus
seeded noise), a few milliseconds per epoch. Ray is told it has ``--concurrent`` CPUs (fake resources) so that many
trials run at once on 2 cores.

Measured: the driver's resident memory over the search (sampled every second, shown at each 10% of trials ended),
the latency of each Optuna suggestion against the number of trials already in the study, MLflow writes per second
(run creation, one log_batch per epoch, end), and whether anything was lost: every epoch a trial reported to Tune
must be in its MLflow run, every trial in the Optuna study with a final state.

    python benchmarks/search_scale.py                      # 1,000 trials, SQLite stores
    python benchmarks/search_scale.py --postgres           # the same with PostgreSQL (initdb/pg_ctl on PATH)
    python benchmarks/search_scale.py --quick              # 150 trials: SQLite untuned, Tune's defaults, as shipped
    python benchmarks/search_scale.py --no-sqlite-tuning   # SQLite's defaults (rollback journal, synchronous=FULL)
    python benchmarks/search_scale.py --tune-defaults      # Tune's automatic loggers and per-trial statistics kept
    python benchmarks/search_scale.py --ask                # study.ask alone at 0/500/1000 trials, untuned vs tuned
    python benchmarks/search_scale.py --tracemalloc        # what the driver keeps from 20% of the trials to the end

SQLite tuning is search/storage.py (WAL journal, synchronous=NORMAL); ``--no-sqlite-tuning`` sets
DRCAPS_SQLITE_TUNING=0 for the driver and Ray's workers. The Tuner runs with what ``search.tune`` gives a search
(search/tune/lean.py: no TensorBoard/CSV logger per trial, ended trials' statistics dropped) unless
``--tune-defaults``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPOCHS = 10
LATENCIES: list[float] = []     # seconds per Optuna suggestion (calls that proposed a trial), in order


def timed_limiter() -> type:
    """Ray's ConcurrencyLimiter, timing each suggestion it passes through to the searcher."""
    from ray.tune.search import ConcurrencyLimiter

    class Timed(ConcurrencyLimiter):
        def suggest(self, trial_id: str) -> Any:
            t0 = time.perf_counter()
            out = super().suggest(trial_id)
            if out is not None:
                LATENCIES.append(time.perf_counter() - t0)
            return out

    return Timed


def synthetic_trial(config: dict[str, Any], uri: str, experiment: str, parent_run_id: str) -> None:
    """A trial that reports a synthetic learning curve to Tune and MLflow, as ``search.tune.run_trial`` does."""
    from ray import tune

    from search import tracking
    from search.tune import split_config

    # As search.tune.run_trial does: with reuse_actors, Tune waits this long (default 2 s) for a stopped trial's thread
    # to finish before reusing its actor. Past it the reuse fails, and the next trial never runs (seen here at
    # 8 concurrent trials on SQLite: 2 of 150 trials lost, left RUNNING in Optuna).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    params, number = split_config(config)
    trial_id = tune.get_context().get_trial_id()
    writes, write_s = 0, 0.0
    t0 = time.perf_counter()
    run_id = tracking.find_or_create_trial_run(uri, experiment, parent_run_id=parent_run_id, trial_id=trial_id,
                                               run_name=f"trial {number}", params=params)
    logger = tracking.TrialLogger(uri, run_id)
    writes, write_s = writes + 2, write_s + time.perf_counter() - t0
    lr, momentum = params["train.lr"], params["train.momentum"]
    ceiling = 0.99 - 0.08 * math.log10(lr / 0.2) ** 2 - 0.2 * (momentum - 0.85) ** 2
    rng = random.Random(number)
    ended, best = False, 0.0
    try:
        for epoch in range(1, EPOCHS + 1):
            time.sleep(0.003)
            acc = max(0.0, ceiling * (1 - math.exp(-epoch / 2.5)) + rng.gauss(0, 0.005))
            best = max(best, acc)
            # The keys drcapsnet.train reports each epoch (Tune keeps statistics per key: memory per trial).
            metrics = {"epoch": epoch, "train_loss": 1 - acc, "train_acc": acc, "lr": lr, "images_per_s": 1e3,
                       "val_loss": 1 - acc, "val_acc": acc, "best_val_acc": best, "best_epoch": epoch,
                       "epoch_s": 0.003}
            t0 = time.perf_counter()
            logger.log_epoch(metrics, step=epoch)
            if epoch == EPOCHS:
                logger.end("FINISHED")
                ended = True
            writes, write_s = writes + 1 + (epoch == EPOCHS), write_s + time.perf_counter() - t0
            tune.report({**metrics, "mlflow_run_id": run_id, "mlflow_writes": writes, "mlflow_write_s": write_s})
    except SystemExit:
        if not ended:
            logger.end("KILLED", outcome="stopped_early")
        raise


def start_postgres(folder: Path, port: int) -> str:
    """A throw-away PostgreSQL server in ``folder`` (initdb, pg_ctl); returns its SQLAlchemy URL prefix."""
    data = folder / "pgdata"
    as_user: list[str] = []
    if os.geteuid() == 0:                     # initdb and postgres refuse to run as root: as the postgres user
        import pwd

        folder.chmod(0o711)
        folder = folder / "pg"
        folder.mkdir()
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        data, as_user = folder / "pgdata", ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", f"-p {port} -k {folder} -c max_connections=300",
                    "-l", str(folder / "pg.log"), "-w", "start"], check=True, capture_output=True)
    for db in ("mlflow", "optuna"):
        subprocess.run(["psql", "-h", str(folder), "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                       check=True, capture_output=True)
    # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3; drcaps' cluster extra installs psycopg2.
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}"


def ask_benchmark(sizes: tuple[int, ...] = (0, 500, 1000), asks: int = 30) -> None:
    """``study.ask`` alone (drcaps' TPE, the benchmark's space) on a SQLite study already holding N finished trials
    (1-10 intermediate values each), with SQLite's defaults and with search/storage.py; after each ask, 3
    intermediate values and a tell, as a search writes them (timed apart: "writes")."""
    import optuna

    from search.space import make_sampler
    from search.storage import tuned_optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
             "momentum": optuna.distributions.FloatDistribution(0.5, 0.99)}
    rng = random.Random(0)
    past = []
    for _ in range(max(sizes)):
        lr, m = 10 ** rng.uniform(-3, 0), rng.uniform(0.5, 0.99)
        steps = rng.randint(1, 10)
        curve = {e: 0.9 * (1 - math.exp(-e / 2.5)) - 0.1 * abs(math.log10(lr / 0.2)) for e in range(1, steps + 1)}
        past.append(optuna.trial.create_trial(
            params={"lr": lr, "momentum": m}, distributions=space, intermediate_values=curve,
            value=None if steps < 10 else curve[steps],
            state=optuna.trial.TrialState.PRUNED if steps < 10 else optuna.trial.TrialState.COMPLETE))
    print(f"study.ask alone on SQLite ({asks} asks at each size, each then 3 reports + tell), ms; "
          f"load average {os.getloadavg()[0]:.1f}:")
    print(f"  {'trials':>6s} {'SQLite':>10s} {'ask median':>10s} {'ask p95':>8s} {'writes median':>13s}")
    with tempfile.TemporaryDirectory(prefix="drcaps-ask-") as tmp:
        for n in sizes:
            for tuned in (False, True):
                url = f"sqlite:///{tmp}/ask-{n}-{int(tuned)}.db"
                storage = tuned_optuna_storage(url) if tuned else optuna.storages.RDBStorage(url)
                study = optuna.create_study(study_name="ask", storage=storage, direction="maximize",
                                            sampler=make_sampler("tpe", 0))
                study.add_trials(past[:n])
                ask_ms, write_ms = [], []
                for i in range(asks):
                    t0 = time.perf_counter()
                    trial = study.ask(fixed_distributions=space)
                    t1 = time.perf_counter()
                    for e in range(1, 4):
                        trial.report(0.5 + 0.01 * i, e)
                    study.tell(trial, None, state=optuna.trial.TrialState.PRUNED)
                    ask_ms.append(1e3 * (t1 - t0))
                    write_ms.append(1e3 * (time.perf_counter() - t1))
                ask_ms.sort()
                print(f"  {n:6d} {'tuned' if tuned else 'defaults':>10s} {statistics.median(ask_ms):10.1f} "
                      f"{ask_ms[int(0.95 * (len(ask_ms) - 1))]:8.1f} {statistics.median(write_ms):13.1f}")
                storage.engine.dispose()


def type_counts() -> dict[str, int]:
    """Live objects in the driver per type (gc-tracked objects only)."""
    import gc

    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def report_tracemalloc(traced: dict[str, Any], trials: int) -> None:
    """What the driver allocated after 20% of the trials and still held when the experiment ended."""
    snap = traced["end"].filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snap.statistics("traceback")
    total = sum(st.size for st in stats)
    n = trials - traced["start"]
    print(f"\ndriver: allocated after trial {traced['start']} and still held at the end: {total / 2**20:.1f} MiB "
          f"= {total / max(n, 1) / 1024:.1f} KiB per later trial; largest by where they were allocated:")
    for st in stats[:14]:
        frames = [f for f in st.traceback if "tracemalloc" not in f.filename]
        ours = [f for f in frames if "/site-packages/" not in f.filename or "/ray/tune/" in f.filename
                or "/optuna/" in f.filename or "/mlflow/" in f.filename]
        where = " <- ".join(f"{short(f.filename)}:{f.lineno}" for f in list(reversed(ours or frames))[:4])
        print(f"  {st.size / 2**20:7.2f} MiB {st.count:8d} blocks  {where}")
    before, after = traced["types_start"], traced["types_end"]
    grown = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in after), reverse=True)[:12]
    print(f"  live objects grown most over those {n} trials: "
          + ", ".join(f"{k.rsplit('.', 1)[-1]} {d:+d}" for d, k in grown if d > 0))


def short(path: str) -> str:
    return path.split("/site-packages/")[-1] if "/site-packages/" in path else path.replace(str(ROOT) + "/", "")


def tune_env(defaults: bool) -> Any:
    from search.tune import lean, scoped_env

    return scoped_env({} if defaults else lean.LEAN_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="default 1000 (quick: 150)")
    parser.add_argument("--concurrent", type=int, default=8, help="trials at once (Ray is told it has this many CPUs)")
    parser.add_argument("--postgres", action="store_true", help="MLflow and Optuna on a local PostgreSQL server")
    parser.add_argument("--port", type=int, default=55432)
    parser.add_argument("--quick", action="store_true",
                        help="150 trials, three times (--no-sqlite-tuning, --tune-defaults, as shipped), then --ask")
    parser.add_argument("--no-sqlite-tuning", action="store_true",
                        help="SQLite's defaults (DRCAPS_SQLITE_TUNING=0), not search/storage.py's tuning")
    parser.add_argument("--tune-defaults", action="store_true",
                        help="Tune's automatic loggers and per-trial statistics, not search/tune/lean.py's")
    parser.add_argument("--ask", action="store_true", help="only the study.ask microbenchmark")
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)   # --quick's second run
    parser.add_argument("--tracemalloc", action="store_true",
                        help="report what the driver allocated after 20%% of the trials and still holds at the end")
    args = parser.parse_args()
    trials = args.trials or (150 if args.quick else 1000)
    if args.ask:
        ask_benchmark()
        return
    if args.quick and not (args.postgres or args.no_sqlite_tuning or args.tuned or args.tune_defaults):
        # Side by side, each in its own process (fresh stores, fresh Ray): SQLite's defaults, Tune's, as shipped.
        base = [sys.executable, __file__, "--trials", str(trials), "--concurrent", str(args.concurrent)]
        base += ["--tracemalloc"] if args.tracemalloc else []
        for extra in (["--no-sqlite-tuning"], ["--tune-defaults"], ["--tuned"]):
            print(f"\n===== {' '.join(extra)} =====", flush=True)
            subprocess.run(base + extra, check=True)
        print("\n===== study.ask =====", flush=True)
        ask_benchmark()
        return
    if args.no_sqlite_tuning:
        os.environ["DRCAPS_SQLITE_TUNING"] = "0"            # read by search/storage.py; Ray's workers inherit it

    import ray  # noqa: I001 (first: it puts its vendored psutil on sys.path)
    import psutil
    from ray import tune

    from search import tracking
    from search.experiment import experiment_from_dict
    from search.tune import lean, make_scheduler, make_searcher

    tmp = Path(tempfile.mkdtemp(prefix="drcaps-scale-"))
    try:
        if args.postgres:
            base = start_postgres(tmp, args.port)
            uri, storage_url, store = f"{base}/mlflow", f"{base}/optuna", "PostgreSQL"
        else:
            uri, storage_url = f"sqlite:///{tmp / 'mlflow.db'}", f"sqlite:///{tmp / 'optuna.db'}"
            store = "SQLite, defaults (rollback journal, synchronous=FULL)" if args.no_sqlite_tuning else \
                "SQLite, tuned (WAL, synchronous=NORMAL)"
        exp = experiment_from_dict({
            "name": "scale", "model": {"preset": "tiny"}, "data": {"dataset": "digits"},
            "train": {"epochs": EPOCHS, "device": "cpu"},
            "search": {"num_samples": trials, "max_concurrent": args.concurrent, "seed": 0,
                       "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 3.0},
                       "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1.0, "log": True},
                                 "train.momentum": {"type": "float", "low": 0.5, "high": 0.99}}},
            "tracking": {"uri": uri, "experiment": "scale"}}, base_dir=tmp)
        parent = tracking.start_search_run(uri, "scale", run_name="scale", params={}, tags={})
        searcher = make_searcher(exp, "scale", storage_url)
        latencies = LATENCIES
        ended = [0]

        traced: dict[str, Any] = {}

        class Count(tune.Callback):
            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                ended[0] += 1

            def on_experiment_end(self, trials: list, **info: Any) -> None:
                if args.tracemalloc and tracemalloc.is_tracing():
                    traced["end"] = tracemalloc.take_snapshot()
                    traced["types_end"] = type_counts()
                    tracemalloc.stop()

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                ended[0] += 1

        load_before = os.getloadavg()[0]
        ray.init(num_cpus=args.concurrent, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"DRCAPS_SQLITE_TUNING": os.environ.get("DRCAPS_SQLITE_TUNING", "1")}})
        me = psutil.Process()
        samples: list[tuple[float, int, float, int]] = []   # (s since start, trials ended, driver RSS MiB, threads)
        stop = threading.Event()
        t_start = time.perf_counter()

        def sample() -> None:
            while not stop.is_set():
                if args.tracemalloc and "start" not in traced and ended[0] >= trials * 0.2:
                    traced["start"], traced["types_start"] = ended[0], type_counts()
                    tracemalloc.start(8)
                samples.append((time.perf_counter() - t_start, ended[0], me.memory_info().rss / 2 ** 20,
                                me.num_threads()))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(synthetic_trial, uri=uri, experiment="scale",
                                                     parent_run_id=parent), {"cpu": 1}),
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=trials, reuse_actors=True,
                                        search_alg=timed_limiter()(searcher, max_concurrent=args.concurrent),
                                        scheduler=make_scheduler(exp, EPOCHS)),
            run_config=tune.RunConfig(name="scale", storage_path=str(tmp / "ray"), verbose=0,
                                      callbacks=[Count()] + ([] if args.tune_defaults else lean.lean_callbacks())))
        with tune_env(args.tune_defaults):
            results = tuner.fit()
        wall = time.perf_counter() - t_start
        stop.set()
        sampler.join()
        ray.shutdown()

        # --- what was lost?
        reported = {str(r.metrics.get("mlflow_run_id")): (len(r.metrics_dataframe) if r.metrics_dataframe is not None
                                                         else 0, r.metrics) for r in results}
        runs = tracking.child_runs(uri, parent)
        lost_epochs, missing_runs, writes, write_s = 0, 0, 0, 0.0
        by_id = {r.run_id: r for r in runs}
        for run_id, (n, last) in reported.items():
            if run_id not in by_id:
                missing_runs += 1
                continue
            logged = len(tracking.metric_history(uri, run_id, "val_acc"))
            lost_epochs += max(0, n - logged)
            writes += int(last.get("mlflow_writes", 0))
            write_s += float(last.get("mlflow_write_s", 0.0))
        import optuna

        study = optuna.load_study(study_name="scale", storage=storage_url)
        states: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        errors = sum(1 for r in results if r.error)
    finally:
        if args.postgres:
            data = next(tmp.glob("**/pgdata"), tmp / "pgdata")
            subprocess.run((["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else [])
                           + ["pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{trials} simulated trials (up to {EPOCHS} epochs, ASHA), {args.concurrent} at once, MLflow and Optuna on "
          f"{store}; Tune {'defaults' if args.tune_defaults else 'as search.tune runs it (lean.py)'}; "
          f"{os.cpu_count()} cores (shared), load average {load_before:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; wall {wall:.0f} s, {trials / wall:.1f} trials/s")
    print("\ndriver memory (RSS) as trials end:")
    print(f"  {'trials ended':>12s} {'time s':>8s} {'RSS MiB':>8s} {'threads':>8s}")
    shown = set()
    for t, n, rss, threads in samples:
        decile = n * 10 // max(trials, 1)
        if decile not in shown:
            shown.add(decile)
            print(f"  {n:12d} {t:8.0f} {rss:8.0f} {threads:8d}")
    if samples:
        print(f"  {samples[-1][1]:12d} {samples[-1][0]:8.0f} {samples[-1][2]:8.0f} {samples[-1][3]:8d}")
    warm = [rss for _, n, rss, _ in samples if n >= trials * 0.2]
    if warm:
        print(f"  after 20% of trials: min {min(warm):.0f}, max {max(warm):.0f} MiB "
              f"(growth {max(warm) - warm[0]:+.0f} MiB over the remaining {100 - 20}%)")
    print("\nOptuna suggestion latency (ms) against trials already in the study:")
    print(f"  {'study size':>12s} {'median':>8s} {'p95':>8s} {'max':>8s}")
    step = max(1, len(latencies) // 10)
    for i in range(0, len(latencies), step):
        chunk = sorted(latencies[i: i + step])
        print(f"  {i:5d}-{i + len(chunk) - 1:<6d} {1e3 * statistics.median(chunk):8.1f} "
              f"{1e3 * chunk[int(0.95 * (len(chunk) - 1))]:8.1f} {1e3 * chunk[-1]:8.1f}")
    if "end" in traced:
        report_tracemalloc(traced, trials)
    print(f"\nMLflow: {writes} writes from the trials in {wall:.0f} s = {writes / wall:.0f} writes/s for the search; "
          f"mean {1e3 * write_s / max(writes, 1):.1f} ms per write inside a trial")
    print(f"lost: {lost_epochs} epoch metrics missing from MLflow, {missing_runs} trials without an MLflow run, "
          f"{errors} trials errored; Optuna study states {states} (of {trials} trials)")


if __name__ == "__main__":
    main()
