"""The drcaps training step against a straightforward per-capsule CapsNet, side by side in one run, on the CPU.

The reference is written here the way the most-used public PyTorch CapsNets write it (gram-ai/capsule-networks,
after Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules", arXiv:1710.09829): PrimaryCaps as one
``Conv2d`` per capsule dimension whose outputs are stacked, DigitCaps as one weight matrix per (class, input capsule)
pair applied by a broadcast ``@`` over a 5-D tensor, routing on that 5-D layout, backpropagating through every
routing iteration. It computes the same network as ``drcapsnet.model.CapsNet`` (same layer sizes, squash,
softmax over the parents, label-masked decoder, margin + reconstruction loss); only the layout and the kernels
differ. drcaps is measured with its default routing (votes detached in the inner iterations, as the authors'
code does) and with ``detach_routing=False`` (the reference's exact gradients).

Timing: rounds alternate one reference step and one drcaps step on the same batch, so a machine shared with other
jobs slows both alike; images/s are medians over rounds, and the ratio is the median of per-round ratios.

    python benchmarks/step_reference.py               # paper and small presets, batch 128
    python benchmarks/step_reference.py --quick       # fewer rounds (smoke, < 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import cpu_name  # noqa: E402
from drcapsnet.config import ModelConfig, model_preset  # noqa: E402
from drcapsnet.losses import capsnet_loss  # noqa: E402
from drcapsnet.model import CapsNet  # noqa: E402


def ref_squash(t: Tensor, dim: int = -1) -> Tensor:
    sq = (t ** 2).sum(dim=dim, keepdim=True)
    return sq / (1 + sq) * t / torch.sqrt(sq + 1e-8)


class RefPrimaryCaps(nn.Module):
    """One Conv2d per capsule dimension (``dim`` convolutions of ``types`` channels), stacked on the last axis."""

    def __init__(self, in_ch: int, types: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.capsules = nn.ModuleList([nn.Conv2d(in_ch, types, kernel, stride) for _ in range(dim)])

    def forward(self, x: Tensor) -> Tensor:                              # (B, C, H, W)
        outs = [cap(x).view(x.size(0), -1, 1) for cap in self.capsules]  # dim x (B, N_in, 1)
        return ref_squash(torch.cat(outs, dim=-1))                        # (B, N_in, D_in)


class RefDigitCaps(nn.Module):
    """A (D_in x D_out) matrix per (class, input capsule); routing on the (K, B, N_in, 1, D_out) priors."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.iterations = cfg.routing_iterations
        self.route_weights = nn.Parameter(
            torch.randn(cfg.num_classes, cfg.num_primary_capsules, cfg.primary_dim, cfg.units) * 0.01)

    def forward(self, u: Tensor) -> Tensor:                              # (B, N_in, D_in)
        priors = u[None, :, :, None, :] @ self.route_weights[:, None, :, :, :]   # (K, B, N_in, 1, D_out)
        logits = torch.zeros_like(priors)
        for i in range(self.iterations):
            probs = F.softmax(logits, dim=0)                             # over the parents (classes)
            outputs = ref_squash((probs * priors).sum(dim=2, keepdim=True))       # (K, B, 1, 1, D_out)
            if i != self.iterations - 1:
                logits = logits + (priors * outputs).sum(dim=-1, keepdim=True)
        return outputs.squeeze(2).squeeze(2).transpose(0, 1)             # (B, K, D_out)


class RefCapsNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv_channels, cfg.conv_kernel)
        self.primary = RefPrimaryCaps(cfg.conv_channels, cfg.primary_types, cfg.primary_dim,
                                      cfg.primary_kernel, cfg.primary_stride)
        self.digits = RefDigitCaps(cfg)
        sizes = [cfg.num_classes * cfg.units, *cfg.decoder_hidden, cfg.in_channels * cfg.image_size ** 2]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers[-1] = nn.Sigmoid()
        self.decoder = nn.Sequential(*layers)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        v = self.digits(self.primary(F.relu(self.conv1(x))))            # (B, K, D_out)
        lengths = (v ** 2).sum(dim=-1) ** 0.5                           # (B, K)
        mask = torch.eye(v.shape[1], device=x.device).index_select(0, y)  # (B, K)
        return lengths, self.decoder((v * mask[:, :, None]).reshape(x.size(0), -1))


def make_step(cfg: ModelConfig, batch: int, reference: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model: nn.Module = RefCapsNet(cfg) if reference else CapsNet(cfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_classes, (batch,))

    def step() -> None:
        if reference:
            lengths, recon = model(x, y)
        else:
            out = model(x, y)
            lengths, recon = out.lengths, out.reconstruction
        loss = capsnet_loss(lengths, recon, x, y, cfg.reconstruction_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(step: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def compare(cfg: ModelConfig, batch: int, rounds: int, contenders: dict[str, Callable[[], None]]
            ) -> dict[str, tuple[float, float]]:
    """``{name: (median img/s, median per-round ratio vs the first)}``; one warm-up step each, then rounds."""
    for step in contenders.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            times[name].append(timed(step))
    base = next(iter(times.values()))
    return {name: (batch / statistics.median(ts), statistics.median(b / t for b, t in zip(base, ts)))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per preset (default 8, quick 3)")
    parser.add_argument("--presets", default="paper,small")
    parser.add_argument("--quick", action="store_true", help="3 rounds, batch 64: a smoke run, not a measurement")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 8)
    batch = 64 if args.quick and args.batch_size == 128 else args.batch_size
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"python {platform.python_version()}; batch {batch}, {rounds} interleaved rounds; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"\n{'preset':8s} {'implementation':44s} {'img/s':>8s} {'vs reference':>13s}")
    for preset in args.presets.split(","):
        cfg = model_preset(preset)
        contenders = {
            "reference (per-capsule, gram-ai style)": make_step(cfg, batch, reference=True),
            "drcaps (default: inner votes detached)": make_step(cfg, batch, reference=False),
            "drcaps, detach_routing=False (same grads)": make_step(model_preset(preset, detach_routing=False),
                                                                  batch, reference=False),
        }
        for name, (ips, ratio) in compare(cfg, batch, rounds, contenders).items():
            print(f"{preset:8s} {name:44s} {ips:8.1f} {ratio:12.2f}x", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (a shared machine: other jobs slow every row alike)")


if __name__ == "__main__":
    main()
