"""Inference latency per image of the ``small`` DR-CapsNet for routing_iterations 1..5, side by side in one run.

``drcapsnet.cost.latency_ms`` exactly as a trial measures it (warm-up passes thrown away, then the median of timed
forward passes on the device, divided by the batch), with FLOPs and parameters beside it. The variants are measured
in interleaved rounds (1, 2, ..., 5, 1, 2, ...) so that a change in the machine's load hits all of them alike; the
figure is the median of the rounds' medians, with the spread (min-max over rounds) and the fastest single pass
(the least disturbed one, a floor on a busy machine). CPU threads: 1 by default, as a quickstart trial has (1 CPU).
Many short rounds (9 x 10 passes by default) rather than a few long ones: on a shared machine the load comes in
bursts, and the median over rounds outvotes them (docs/benchmarks.md).

    python benchmarks/latency.py                       # CPU, batch 1 and 32
    python benchmarks/latency.py --device cuda         # the GPU: fp32, then bf16 autocast (as a trial evaluates)
    python benchmarks/latency.py --quick               # fewer passes (smoke)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drcapsnet.config import model_preset  # noqa: E402
from drcapsnet.cost import device_name, flops, latency_ms, params  # noqa: E402
from drcapsnet.model import CapsNet  # noqa: E402
from drcapsnet.precision import resolve_precision  # noqa: E402

ITERATIONS = (1, 2, 3, 4, 5)


def measure(device: torch.device, batch: int, repeats: int, warmup: int, rounds: int, bf16: bool) -> None:
    precision = resolve_precision(device, bf16)
    models = {}
    for r in ITERATIONS:
        torch.manual_seed(0)
        models[r] = CapsNet(model_preset("small", routing_iterations=r)).to(device)
        if precision.channels_last:                         # as train() and a trial set it up
            models[r] = models[r].to(memory_format=torch.channels_last)
    cfg = model_preset("small")
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    runs: dict[int, list[float]] = {r: [] for r in ITERATIONS}
    fastest: dict[int, float] = {}
    for _ in range(rounds):
        for r, model in models.items():
            measured = latency_ms(model, shape, batch=batch, repeats=repeats, warmup=warmup, precision=precision)
            runs[r].append(measured.latency_ms)
            fastest[r] = min(fastest.get(r, float("inf")), min(measured.pass_ms) / batch)
    print(f"\nbatch {batch}, {precision.name}: {warmup} warm-up + {repeats} timed passes per round, {rounds} rounds")
    print(f"{'routing_iterations':>18} {'latency_ms/image':>17} {'(min-max)':>19} {'vs 1':>6} {'fastest pass':>13} "
          f"{'MFLOPs/image':>13} {'params':>10}")
    base = statistics.median(runs[1])
    for r, model in models.items():
        med = statistics.median(runs[r])
        print(f"{r:>18} {med:>17.4f} {f'({min(runs[r]):.4f}-{max(runs[r]):.4f})':>19} {med / base:>5.2f}x "
              f"{fastest[r]:>13.4f} {flops(model, shape) / 1e6:>13.2f} {params(model):>10,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a quickstart trial)")
    parser.add_argument("--quick", action="store_true", help="5 repeats, 2 warm-up, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.rounds = 5, 2, 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device: {device_name(device)}; torch {torch.__version__}; os.cpu_count() {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    for batch in args.batch:
        measure(device, batch, args.repeats, args.warmup, args.rounds, bf16=False)
        if resolve_precision(device, True).name == "bf16":     # CUDA, or a CPU with native bf16
            measure(device, batch, args.repeats, args.warmup, args.rounds, bf16=True)


if __name__ == "__main__":
    main()
