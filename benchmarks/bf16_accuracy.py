"""bf16 on the CPU: whole trainings in fp32 and in bf16 variants, side by side: training images/s AND accuracy.

Each (dataset, seed) trains every variant one after the other in this process (same data, seed, epochs, threads),
a machine shared with other jobs slows them, but not alike when the load changes between runs: so beside the wall
images/s (the mean of the per-epoch figures after the first epoch, oneDNN's first-call set-up) it prints the run's
process CPU time (one thread: what the load steals shows in wall time, much less in CPU time), and images per
CPU-second over the whole run (training images x epochs / CPU s, evaluation included). Accuracies: the last
epoch's validation and the held-out test split. The step-level speed ratios are benchmarks/public_port.py's.

    python benchmarks/bf16_accuracy.py                                 # digits + 5k MNIST, seeds 0 and 1
    python benchmarks/bf16_accuracy.py --mnist-dir ../shared/data/mnist-test --seeds 0 --datasets digits

Variants: ``fp32``; ``bf16`` (autocast; squash and routing in fp32, as shipped: ``drcapsnet.model.
FP32_ROUTING_ON_CPU``) in NCHW and in channels-last; ``bf16, bf16 routing`` (the same with squash and routing left
to autocast, i.e. in bf16), channels-last. Recipes: the quickstart's enqueued point on the digits (``small``, SGD
lr 0.3 momentum 0.9, batch 32, 6 epochs) and the MNIST recipe of docs/benchmarks.md on a 5,000-image training
split of the MNIST test set (IDX; ``data.limit_train=5000``, lr decay 0.9, 3 epochs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import drcapsnet.model as capsmodel  # noqa: E402
from benchmarks.train_throughput import cpu_name  # noqa: E402
from drcapsnet.config import DataConfig, TrainConfig, model_preset  # noqa: E402
from drcapsnet.data import load_datasets  # noqa: E402
from drcapsnet.precision import Precision, cpu_bf16  # noqa: E402
from drcapsnet.train import train  # noqa: E402

FP32 = Precision("cpu", torch.float32, False, "benchmark: fp32")
VARIANTS: dict[str, tuple[Precision, bool]] = {     # label -> (precision, squash + routing in fp32)
    "fp32": (FP32, True),
    "bf16": (Precision("cpu", torch.bfloat16, False, "benchmark"), True),
    "bf16 + channels-last": (Precision("cpu", torch.bfloat16, True, "benchmark"), True),
    "bf16 + channels-last + bf16 routing": (Precision("cpu", torch.bfloat16, True, "benchmark"), False),
}


def recipes(mnist_dir: str) -> dict[str, tuple[DataConfig, TrainConfig]]:
    sgd = TrainConfig(optimizer="sgd", lr=0.3, momentum=0.9, device="cpu")
    return {
        "digits": (DataConfig(dataset="digits", batch_size=32),
                   dataclasses.replace(sgd, epochs=6, lr_decay=1.0)),
        "mnist-5k": (DataConfig(dataset="idx", data_dir=mnist_dir, batch_size=32, limit_train=5000),
                     dataclasses.replace(sgd, epochs=3, lr_decay=0.9)),
    }


def run(data_cfg: DataConfig, train_cfg: TrainConfig, datasets: object, precision: Precision,
        fp32_routing: bool) -> dict[str, float]:
    capsmodel.FP32_ROUTING_ON_CPU = fp32_routing
    history: list[dict[str, float]] = []
    cpu0 = time.process_time()
    try:
        train(model_preset("small"), data_cfg, train_cfg, history.append, datasets=datasets,  # type: ignore[arg-type]
              precision=precision)
    finally:
        capsmodel.FP32_ROUTING_ON_CPU = True
    cpu_s = time.process_time() - cpu0
    later = [m["images_per_s"] for m in history[1:]] or [history[0]["images_per_s"]]
    last = history[-1]
    return {"img_s": statistics.mean(later), "val_acc": last["val_acc"], "test_acc": last["test_acc"],
            "train_loss": last["train_loss"], "cpu_s": cpu_s,
            "img_cpu_s": len(datasets.train.labels) * train_cfg.epochs / cpu_s}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist-test"))
    parser.add_argument("--datasets", default="digits,mnist-5k")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a search trial gets 1 CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels")
    args = parser.parse_args()
    native, why = cpu_bf16()
    print(f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s); native bf16: {native} ({why}); "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    labels = args.variants.split(",")
    all_recipes = recipes(args.mnist_dir)
    print(f"\n{'dataset':9s} {'seed':>4s} {'variant':36s} {'img/s':>7s} {'img/cpu-s':>9s} {'vs fp32':>8s} "
          f"{'val_acc':>8s} {'test_acc':>8s} {'train_loss':>10s} {'load':>5s}")
    for name in args.datasets.split(","):
        data_cfg, base_cfg = all_recipes[name]
        datasets = load_datasets(data_cfg)
        for seed in (int(s) for s in args.seeds.split(",")):
            train_cfg = dataclasses.replace(base_cfg, seed=seed, num_threads=args.threads)
            fp32_ips = None                                    # per CPU-second
            for label in labels:
                t0 = time.perf_counter()
                r = run(data_cfg, train_cfg, datasets, *VARIANTS[label])
                fp32_ips = fp32_ips or r["img_cpu_s"]
                print(f"{name:9s} {seed:4d} {label:36s} {r['img_s']:7.0f} {r['img_cpu_s']:9.0f} "
                      f"{r['img_cpu_s'] / fp32_ips:7.2f}x "
                      f"{r['val_acc']:8.4f} {r['test_acc']:8.4f} {r['train_loss']:10.4f} "
                      f"{os.getloadavg()[0]:5.1f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
