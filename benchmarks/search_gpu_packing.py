"""A real ``drcaps`` search on one GPU, unpacked and packed: the same trials with ``search.resources.gpu`` = 1 and 1/K.

Ray Tune, Optuna and MLflow all run (embedded Ray, SQLite MLflow store in a temporary folder); only the GPU share
per trial changes. Prints, side by side, the search's wall time, the trials' training images/s (each trial's last
epoch, as it logged it to MLflow) and how many trials trained at once, so the gain of packing is measured through
Ray itself rather than estimated. Needs a CUDA GPU and an IDX folder (or ``--dataset digits``):

    python benchmarks/search_gpu_packing.py --data-dir ../shared/data/mnist-test --k 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.steps import require_cuda  # noqa: E402
from search import tracking  # noqa: E402
from search.experiment import experiment_from_dict  # noqa: E402
from search.plan import make_plan  # noqa: E402
from search.publish import publish  # noqa: E402
from search.tune import run_search  # noqa: E402


def search_once(args: argparse.Namespace, gpu: float, tmp: Path) -> tuple[float, list[float], int]:
    import ray

    data = {"dataset": args.dataset, "batch_size": args.batch_size, "shift_pixels": 2}
    if args.dataset == "idx":
        data["data_dir"] = str(Path(args.data_dir).resolve())
    exp = experiment_from_dict({
        "name": f"packing-gpu{gpu:g}",
        "model": {"preset": args.preset},
        "data": data,
        "train": {"epochs": args.epochs, "optimizer": "adam", "lr": 1.0e-3, "device": "auto"},
        "search": {"num_samples": args.trials, "max_concurrent": args.k, "seed": 0, "sampler": "random",
                   "scheduler": {"name": "none"}, "resources": {"cpu": args.cpus, "gpu": gpu},
                   "space": {"train.lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True}}},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }, base_dir=tmp)
    t0 = time.perf_counter()
    try:
        plan = make_plan(exp, storage_path=tmp / "ray", out=tmp / "best.yaml")
        result = publish(plan, run_search(plan, verbose=0))
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    runs = tracking.child_runs(result.tracking_uri, result.parent_run_id)
    ips = [r.metrics["images_per_s"] for r in runs if "images_per_s" in r.metrics]
    return wall, ips, len(result.trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="idx")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--k", type=int, default=4, help="trials per GPU in the packed search")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs per trial")
    args = parser.parse_args()
    require_cuda("search_gpu_packing")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; {args.trials} trials x {args.epochs} epochs, "
          f"{args.preset} preset, batch {args.batch_size}, {args.dataset} {args.data_dir or ''}")
    rows, base = [], None
    for gpu in (1.0, 1.0 / args.k):
        with tempfile.TemporaryDirectory() as d:
            wall, ips, n = search_once(args, gpu, Path(d))
        base = base or wall
        mean = statistics.mean(ips) if ips else float("nan")
        concurrent = 1 if gpu == 1.0 else args.k
        rows.append(f"  {gpu:13.3g} {n:6d} {wall:13.1f} {mean:16.0f} {mean * concurrent:10.0f} {base / wall:13.2f}x")
    # The table last, after everything Ray printed.
    print(f"\n  {'gpu per trial':>13s} {'trials':>6s} {'search wall s':>13s} {'img/s per trial':>16s} "
          f"{'sum img/s':>10s} {'wall vs gpu=1':>14s}")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
