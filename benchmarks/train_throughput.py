"""Training throughput of DR-CapsNet: forward + backward + SGD step, images/s, and seconds per 60,000-image epoch.

Runs every variant side by side in one process on the same random batch, and prints ratios against the paper
preset with dynamic routing (3 iterations, votes detached in the inner iterations). CPU always; CUDA too when
present (bf16 autocast, as ``train`` uses, and the baseline in fp32 beside it). Needs only torch and this repo:

    python benchmarks/train_throughput.py                 # paper preset, batch 128
    python benchmarks/train_throughput.py --quick         # fewer steps (smoke)
    python benchmarks/train_throughput.py --compile       # eager vs train.compile (torch.compile), side by side
    python benchmarks/train_throughput.py --compile --threads 1 --presets small   # + CPU bf16 + channels-last
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.steps import images_per_s, synchronize, training_step  # noqa: E402
from drcapsnet.config import ModelConfig, model_preset  # noqa: E402
from drcapsnet.model import CapsNet, count_parameters  # noqa: E402

VARIANTS: list[tuple[str, ModelConfig, bool]] = [     # (label, model, bf16 autocast on CUDA)
    ("paper, dynamic x3 (baseline)", model_preset("paper"), True),
    ("paper, dynamic x3, no detach", model_preset("paper", detach_routing=False), True),
    ("paper, dynamic x1", model_preset("paper", routing_iterations=1), True),
    ("paper, dynamic x5", model_preset("paper", routing_iterations=5), True),
    ("paper, attention x3", model_preset("paper", routing="attention"), True),
    ("small, dynamic x3", model_preset("small"), True),
    ("paper, dynamic x3, no autocast", model_preset("paper"), False),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure(cfg: ModelConfig, device: torch.device, batch: int, steps: int, warmup: int, bf16: bool = True) -> float:
    """Images per second of full training steps (forward, margin + reconstruction loss, backward, SGD step)."""
    return images_per_s(training_step(cfg, device, batch, bf16), device, batch, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="few steps; a smoke run, not a measurement")
    parser.add_argument("--cpu-variants", default="all", help="'all' or 'baseline': the paper model is slow on CPU")
    parser.add_argument("--compile", action="store_true",
                        help="only eager vs compiled (train.compile), paper and small presets, per device")
    parser.add_argument("--presets", default="paper,small", help="with --compile: which presets")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        compare_compiled(args)
        return

    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads, batch {args.batch_size}")
    print(f"paper preset: {count_parameters(CapsNet(model_preset('paper'))):,} parameters")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
        steps, warmup = (2, 1) if args.quick else ((3, 1) if device.type == "cpu" else (50, 10))
        variants = [v for v in VARIANTS if device.type == "cuda" or "autocast" not in v[0]]   # CPU: always fp32
        variants = variants if device.type == "cuda" or args.cpu_variants == "all" else variants[:1]
        print(f"\n{device.type}: {name}")
        print(f"  {'variant':32s} {'img/s':>9s} {'s/60k epoch':>12s} {'vs baseline':>12s}")
        base = None
        for label, cfg, bf16 in variants:
            ips = measure(cfg, device, args.batch_size, steps, warmup, bf16)
            base = base or ips
            print(f"  {label:32s} {ips:9.0f} {60000 / ips:12.1f} {ips / base:11.2f}x", flush=True)


def compare_compiled(args: argparse.Namespace) -> None:
    """Eager and compiled steps of each preset, alternating rounds on the same batch; the compile time is the
    compiled step's first call (inductor's on-disk cache may shorten it on a second run)."""
    print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} CPU threads, "
          f"batch {args.batch_size}; train.compile = drcapsnet.train.compile_for_training")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
        steps, rounds = (2, 1) if args.quick else ((3, 3) if device.type == "cpu" else (50, 5))
        print(f"\n{device.type}: {name}")
        print(f"  {'preset':8s} {'compile s':>10s} {'eager img/s':>12s} {'compiled img/s':>15s} {'s/60k eager':>12s} "
              f"{'s/60k compiled':>15s} {'ratio':>7s}")
        for preset in args.presets.split(","):
            cfg = model_preset(preset)
            eager = training_step(cfg, device, args.batch_size)
            compiled = training_step(cfg, device, args.batch_size, compiled=True)
            t0 = time.perf_counter()
            compiled()
            synchronize(device)
            compile_s = time.perf_counter() - t0
            e_ips, c_ips = [], []
            for _ in range(rounds):
                e_ips.append(images_per_s(eager, device, args.batch_size, steps, 1))
                c_ips.append(images_per_s(compiled, device, args.batch_size, steps, 1))
            e, c = statistics.median(e_ips), statistics.median(c_ips)
            print(f"  {preset:8s} {compile_s:10.1f} {e:12.0f} {c:15.0f} {60000 / e:12.1f} {60000 / c:15.1f} "
                  f"{c / e:6.2f}x", flush=True)
        if device.type == "cpu":
            compare_compiled_cpu_precisions(args)


def compare_compiled_cpu_precisions(args: argparse.Namespace) -> None:
    """On the CPU, fp32 and bf16 + channels-last (what ``train`` runs where the CPU has native bf16), each eager and
    compiled, and each eager in the other memory format: one step of each in turn per round on the same batch, wall
    and process-CPU seconds (with one thread the CPU time is little moved by other jobs), medians; ratios against
    eager fp32, medians of per-round ratios."""
    from benchmarks.cpu_step import drcaps_step  # here, not on top: it imports this module's cpu_name

    rounds = 2 if args.quick else 5
    print(f"\n  CPU precisions, {torch.get_num_threads()} thread(s), {rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  {'preset':8s} {'variant':28s} {'compile s':>10s} {'img/s':>7s} {'img/cpu-s':>10s} "
          f"{'vs fp32 (wall)':>15s} {'vs fp32 (cpu)':>14s}")
    for preset in args.presets.split(","):
        steps, compile_s = {}, {}
        for label, bf16, cl, compiled in (("fp32", False, False, False), ("fp32 + channels-last", False, True, False),
                                          ("fp32 + compile", False, False, True), ("bf16 (NCHW)", True, False, False),
                                          ("bf16 + channels-last", True, True, False),
                                          ("bf16 + channels-last + compile", True, True, True)):
            steps[label] = drcaps_step(args.batch_size, bf16, cl, compiled=compiled, preset=preset)[0]
            t0 = time.perf_counter()
            steps[label]()                                  # compiles a compiled step; warms an eager one
            compile_s[label] = time.perf_counter() - t0 if compiled else None
        wall: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(rounds):
            for label, step in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                wall[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
        for label in steps:
            rw = statistics.median(a / b for a, b in zip(wall["fp32"], wall[label]))
            rc = statistics.median(a / b for a, b in zip(cpu["fp32"], cpu[label]))
            cs = f"{compile_s[label]:10.1f}" if compile_s[label] is not None else f"{'':10s}"
            print(f"  {preset:8s} {label:28s} {cs} {args.batch_size / statistics.median(wall[label]):7.0f} "
                  f"{args.batch_size / statistics.median(cpu[label]):10.0f} {rw:14.2f}x {rc:13.2f}x", flush=True)
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
