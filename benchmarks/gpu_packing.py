"""GPU packing: K DR-CapsNet trainings at once on one GPU, as Ray runs K trials with ``search.resources.gpu: 1/K``.

Ray's fractional GPUs are only bookkeeping: K trial processes share the device by time-slicing. Whether that pays
depends on how much of the GPU one trial leaves idle (small kernels, Python overhead between launches). This starts
K processes (spawned, like Ray's workers), each training the same preset on its own random batch for a fixed wall
time after a common start, and prints per-process and total images/s side by side against K = 1, plus the peak GPU
memory one process needs (which bounds K). Needs only torch and this repo; Ray itself is not involved:

    python benchmarks/gpu_packing.py                          # small and paper presets, K = 1, 2, 4, 8
    python benchmarks/gpu_packing.py --presets paper --ks 1,2 --seconds 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.steps import require_cuda, training_step  # noqa: E402
from drcapsnet.config import model_preset  # noqa: E402


def _worker(preset: str, batch: int, seconds: float, barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    """One trial: warm up, wait for the others, then count training images for ``seconds``."""
    device = torch.device("cuda")
    step = training_step(model_preset(preset), device, batch)            # bf16, as drcapsnet.train on CUDA
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    barrier.wait()
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        images += 5 * batch
    elapsed = time.perf_counter() - t0
    out.put((images / elapsed, torch.cuda.max_memory_allocated() / 2**20))


def measure(preset: str, k: int, batch: int, seconds: float) -> tuple[list[float], float]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(preset, batch, seconds, barrier, out)) for _ in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return [r[0] for r in results], max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,paper")
    parser.add_argument("--ks", default="1,2,4,8", help="numbers of concurrent trials on the one GPU")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured wall time per K")
    args = parser.parse_args()
    require_cuda("gpu_packing")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, batch {args.batch_size}, "
          f"{args.seconds:g} s per measurement, bf16 autocast")
    for preset in args.presets.split(","):
        print(f"\n{preset} preset")
        print(f"  {'K':>3s} {'img/s per trial':>16s} {'total img/s':>12s} {'total vs K=1':>13s} "
              f"{'per trial vs K=1':>17s} {'peak MiB/trial':>15s}")
        base = None
        for k in (int(v) for v in args.ks.split(",")):
            per, mib = measure(preset, k, args.batch_size, args.seconds)
            mean, total = sum(per) / k, sum(per)
            base = base or total
            print(f"  {k:3d} {mean:16.0f} {total:12.0f} {total / base:12.2f}x {mean / base:16.2f}x {mib:15.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
