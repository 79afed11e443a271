"""One DR-CapsNet training step on the CPU in a given precision and memory format, as ``drcapsnet.train`` runs it.

Forward (bf16 autocast or not; channels-last or not; compiled by ``train.compile``'s function or not), margin +
reconstruction loss in fp32, backward, SGD step, on one fixed random batch. Shared by ``public_port.py`` and
``train_throughput.py --compile``. ``fp32_routing=False`` runs the forward with ``drcapsnet.model.
FP32_ROUTING_ON_CPU`` off (squash and routing left to autocast: bf16), to measure what widening them costs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import drcapsnet.model as capsmodel
from benchmarks.step_reference import RefCapsNet
from drcapsnet.config import ModelConfig, model_preset
from drcapsnet.losses import capsnet_loss
from drcapsnet.model import CapsNet
from drcapsnet.train import compile_for_training

Step = Callable[[], None]


def batch_of(cfg: ModelConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random images ``(B, C, H, W)`` and labels ``(B,)`` for every contender."""
    torch.manual_seed(0)
    return (torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size),
            torch.randint(0, cfg.num_classes, (batch,)))


def drcaps_step(batch: int, bf16: bool, channels_last: bool, compiled: bool = False, reference: bool = False,
                fp32_routing: bool = True, preset: str = "paper") -> tuple[Step, nn.Module]:
    """The step and its model; ``reference``: the per-capsule CapsNet of ``step_reference.py`` instead."""
    torch.manual_seed(0)
    cfg = model_preset(preset)
    model: nn.Module = (RefCapsNet(cfg) if reference else CapsNet(cfg)).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch_of(cfg, batch)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    forward = compile_for_training(model, torch.device("cpu")) if compiled else model

    def step() -> None:
        capsmodel.FP32_ROUTING_ON_CPU = fp32_routing        # read by the forward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, y)
        capsmodel.FP32_ROUTING_ON_CPU = True
        lengths, recon = (out[0], out[1]) if reference else (out.lengths, out.reconstruction)
        loss = capsnet_loss(lengths.float(), recon, x, y, cfg.reconstruction_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model
