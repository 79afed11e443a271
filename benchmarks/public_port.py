"""The drcaps training step against the most-used public PyTorch CapsNet, side by side in one run, on the CPU.

The public port is XifengGuo/CapsNet-Pytorch (its ``CapsuleNet``: the paper's network, 8,215,568 parameters, like
drcaps' ``paper`` preset). None of its code is in this repository: give this script a checkout of it, or the git
folder of a snapshot (the two files it needs, ``capsulelayers.py`` and ``capsulenet.py``, are then read with
``git show`` into a temporary folder), by ``--port PATH`` or ``DRCAPS_PUBLIC_PORT``. Its ``DenseCapsule`` creates the
routing logits with ``Variable(torch.zeros(...)).cuda()``; on a CPU-only machine that name is pointed, in its
module only, at a stand-in whose ``.cuda()`` leaves the tensor where it is. Nothing else of it is changed.

Contenders (batch 128, the same random batch for all; forward, margin + reconstruction loss of drcaps for all,
backward, SGD step): the port in fp32 (as published) and under CPU bf16 autocast (what a user of it would wrap it
in); drcaps in fp32, bf16 (``train.bf16`` on this CPU, NCHW), bf16 + channels-last (what ``train`` runs here), and
that + ``train.compile`` (and with ``--bf16-routing`` the shipped bf16 step with squash and routing in bf16 instead
of fp32); the per-capsule reference of ``benchmarks/step_reference.py`` in fp32. Rounds alternate
one step of each, so a shared machine slows all alike; img/s are medians over rounds, ratios medians of per-round
ratios. Each step is timed twice: wall clock, and the process's CPU time. With ``--threads 1`` the CPU time is what
the step itself costs, little moved by other jobs on the machine (they take wall time, not this thread's CPU
time); with more threads it also counts oneDNN's threads waiting for each other, so read the wall figures then.

    python benchmarks/public_port.py --port /path/to/CapsNet-Pytorch          # 5 rounds
    DRCAPS_PUBLIC_PORT=/work/.mirror/XifengGuo+CapsNet-Pytorch/repo/.git python benchmarks/public_port.py --quick
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_step import Step, batch_of, drcaps_step  # noqa: E402
from benchmarks.train_throughput import cpu_name  # noqa: E402
from drcapsnet.config import model_preset  # noqa: E402
from drcapsnet.losses import capsnet_loss  # noqa: E402
from drcapsnet.model import count_parameters  # noqa: E402
from drcapsnet.precision import cpu_bf16, cpu_flags  # noqa: E402

PORT_FILES = ("capsulelayers.py", "capsulenet.py")


class _StayOnDevice:
    """What the port's ``Variable(t)`` returns here: ``.cuda()`` gives ``t`` back, on the device it is on."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def cuda(self) -> torch.Tensor:
        return self.t


def load_port(path: Path) -> ModuleType:
    """The port's ``capsulenet`` module, from a checkout folder or a snapshot's git folder."""
    if (path / PORT_FILES[1]).is_file():
        folder = path
    else:
        folder = Path(tempfile.mkdtemp(prefix="capsnet-pytorch-"))
        for name in PORT_FILES:
            text = subprocess.run(["git", f"--git-dir={path}", "show", f"HEAD:{name}"], check=True,
                                  capture_output=True, text=True).stdout
            (folder / name).write_text(text)
    sys.path.insert(0, str(folder))
    layers = importlib.import_module("capsulelayers")
    if not torch.cuda.is_available():
        layers.Variable = _StayOnDevice                  # type: ignore[attr-defined]
    return importlib.import_module("capsulenet")


def port_step(port: ModuleType, batch: int, bf16: bool) -> tuple[Step, nn.Module]:
    torch.manual_seed(0)
    model = port.CapsuleNet(input_size=[1, 28, 28], classes=10, routings=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch_of(model_preset("paper"), batch)
    onehot = torch.nn.functional.one_hot(y, 10).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lengths, recon = model(x, onehot)
        loss = capsnet_loss(lengths.float(), recon.flatten(1), x, y, 0.0005)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def rounds_of(contenders: dict[str, Step], rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per step of each contender over ``rounds`` alternating rounds (after one untimed step
    each)."""
    for step in contenders.values():
        step()
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of (a's img/s / b's img/s) = b's time / a's time, round by round."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=Path, default=os.environ.get("DRCAPS_PUBLIC_PORT"),
                        help="a checkout (or snapshot git folder) of XifengGuo/CapsNet-Pytorch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 rounds, no compile: a smoke run")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--bf16-routing", action="store_true",
                        help="also drcaps bf16 + channels-last with squash and routing left in bf16")
    args = parser.parse_args()
    if args.port is None:
        sys.exit("public_port.py: give --port PATH or DRCAPS_PUBLIC_PORT (a checkout of XifengGuo/CapsNet-Pytorch)")
    batch, rounds = (32, 2) if args.quick else (args.batch_size, args.rounds)
    torch.set_num_threads(args.threads)
    port = load_port(args.port)
    flags = sorted(cpu_flags(Path("/proc/cpuinfo").read_text()) & {"amx_bf16", "amx_tile", "avx512_bf16",
                                                                      "avx512f", "avx512_fp16", "avx2"})
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, flags {' '.join(flags)}; "
          f"native bf16: {cpu_bf16()[0]}; torch {torch.__version__}, python {platform.python_version()}; "
          f"batch {batch}, {rounds} rounds; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    built = {
        "port fp32": port_step(port, batch, bf16=False),
        "port bf16": port_step(port, batch, bf16=True),
        "reference fp32": drcaps_step(batch, False, False, reference=True),
        "drcaps fp32": drcaps_step(batch, False, False),
        "drcaps bf16": drcaps_step(batch, True, False),
        "drcaps bf16 + channels-last": drcaps_step(batch, True, True),
    }
    if args.bf16_routing:
        built["drcaps bf16 + channels-last, bf16 routing"] = drcaps_step(batch, True, True, fp32_routing=False)
    compile_s = None
    if not (args.quick or args.no_compile):
        built["drcaps bf16 + channels-last + compile"] = drcaps_step(batch, True, True, compiled=True)
        t0 = time.perf_counter()
        built["drcaps bf16 + channels-last + compile"][0]()
        compile_s = time.perf_counter() - t0
    params = {name: count_parameters(model) for name, (_, model) in built.items()}
    wall, cpu = rounds_of({name: step for name, (step, _) in built.items()}, rounds)
    print(f"parameters: {params['port fp32']:,} (port), {params['drcaps fp32']:,} (drcaps)"
          + (f"; compiling took {compile_s:.1f} s" if compile_s else ""))
    for clock, times in (("wall", wall), ("CPU", cpu)):
        print(f"\n{clock + ' clock':40s} {'img/s':>7s} {'vs port fp32':>13s} {'vs port bf16':>13s} "
              f"{'vs reference':>13s}")
        for name, ts in times.items():
            print(f"{name:40s} {batch / statistics.median(ts):7.1f} {ratio(times, name, 'port fp32'):12.2f}x "
                  f"{ratio(times, name, 'port bf16'):12.2f}x {ratio(times, name, 'reference fp32'):12.2f}x")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
