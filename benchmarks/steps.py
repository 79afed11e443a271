"""What the benchmarks time: one full DR-CapsNet training step on a fixed random batch, and images/s over N of them.

Forward (bf16 autocast on CUDA unless told otherwise, as ``drcapsnet.train`` does), margin + reconstruction loss,
backward, SGD step. Shared by ``train_throughput.py``, ``precision.py`` and ``gpu_packing.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from drcapsnet.config import ModelConfig
from drcapsnet.losses import capsnet_loss
from drcapsnet.model import CapsNet
from drcapsnet.train import compile_for_training


def training_step(cfg: ModelConfig, device: torch.device, batch: int, bf16: bool = True,
                  compiled: bool = False) -> Callable[[], None]:
    """A seeded model, its SGD optimiser and one random batch on ``device``; returns the step to call.
    ``compiled``: the forward through ``drcapsnet.train.compile_for_training``, as ``train.compile`` runs it (the
    first call compiles)."""
    torch.manual_seed(0)
    model = CapsNet(cfg).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    autocast = device.type == "cuda" and bf16
    forward = compile_for_training(model, device) if compiled else model

    def step() -> None:
        if compiled and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = forward(x, y)
        loss = capsnet_loss(out.lengths.float(), out.reconstruction, x, y, cfg.reconstruction_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_s(step: Callable[[], None], device: torch.device, batch: int, steps: int, warmup: int) -> float:
    """``warmup`` untimed steps, then images per second over ``steps`` timed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False)")
