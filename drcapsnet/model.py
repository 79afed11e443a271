"""DR-CapsNet: Conv1 -> PrimaryCaps -> DigitCaps (routing) -> masked reconstruction decoder.

Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules" (arXiv:1710.09829), section 4 and figures 1-2.
The paper preset (``ModelConfig()``) has 8,215,568 parameters, 6,804,224 without the decoder.

Shapes: B batch · C image channels · H = W image size · G primary grid size · N_in = types x G x G primary capsules
· D_in primary dim · K classes · D_out = units (class-capsule dim).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drcapsnet.config import ModelConfig
from drcapsnet.routing import attention_routing, dynamic_routing, squash

# Under CPU bf16 autocast, squash and route in fp32: the primary capsules and the votes leave their conv and bmm in
# bf16 and are widened once, so both squashes, the coupling softmax and the agreement sums keep fp32 accuracy
# (docs/benchmarks.md, "bf16 on the CPU"). benchmarks/bf16_accuracy.py turns it off to measure bf16 routing.
FP32_ROUTING_ON_CPU = True


class CapsNetOutput(NamedTuple):
    lengths: Tensor                  # (B, K) class-capsule lengths: the class probabilities of the paper
    capsules: Tensor                 # (B, K, D_out)
    reconstruction: Tensor | None    # (B, C*H*W) in [0, 1], or None without a decoder
    coupling: Tensor                 # (B, N_in, K) final routing coefficients


class PrimaryCaps(nn.Module):
    """A 9x9/2 convolution whose ``types * dim`` channels are read as ``types`` capsules of ``dim`` per position.

    A capsule is the ``dim`` channels of one type at ONE grid position (channels ``t*dim .. t*dim+dim-1`` at
    (y, x)), not ``dim`` neighbouring positions of one channel, which a plain ``view(B, -1, dim)`` would give.
    """

    def __init__(self, in_channels: int, types: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.types, self.dim = types, dim
        self.conv = nn.Conv2d(in_channels, types * dim, kernel_size=kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:                         # x: (B, conv_channels, H', W')
        out = self.conv(x)                                          # (B, types*dim, G, G)
        b, _, g, _ = out.shape
        out = out.view(b, self.types, self.dim, g, g)               # (B, types, D_in, G, G)
        out = out.permute(0, 1, 3, 4, 2).reshape(b, -1, self.dim)   # (B, N_in, D_in), N_in = types*G*G
        if FP32_ROUTING_ON_CPU and out.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            out = out.float()                                       # squash in fp32 (bf16 out of the conv)
        return squash(out)


class DigitCaps(nn.Module):
    """Class capsules: votes ``u_hat_j|i = W_ij u_i`` (eq. 2) by one batched matmul, then routing."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_in, n_out = cfg.num_primary_capsules, cfg.num_classes
        # (N_in, D_in, N_out*D_out): one matrix per input capsule; N(0, 0.01^2) as in the reference implementation.
        self.weight = nn.Parameter(torch.randn(n_in, cfg.primary_dim, n_out * cfg.units) * 0.01)
        self.prior = (nn.Parameter(torch.zeros(n_in, n_out))
                      if cfg.routing == "attention" and cfg.attention_prior else None)

    def votes(self, u: Tensor) -> Tensor:                           # u: (B, N_in, D_in)
        b, n_in, _ = u.shape
        u_hat = torch.bmm(u.transpose(0, 1), self.weight)            # (N_in, B, N_out*D_out), one bmm over N_in
        return u_hat.view(n_in, b, self.cfg.num_classes, self.cfg.units).transpose(0, 1)  # (B, N_in, N_out, D_out)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.votes(u)                                       # (B, N_in, K, D_out), bf16 under autocast
        if FP32_ROUTING_ON_CPU and u_hat.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.route(u_hat.float())                    # (B, K, D_out), (B, N_in, K) in fp32
        return self.route(u_hat)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """The routing of ``cfg.routing`` over the votes ``u_hat (B, N_in, K, D_out)``."""
        if self.cfg.routing == "attention":
            return attention_routing(u_hat, self.cfg.routing_iterations, prior=self.prior)
        return dynamic_routing(u_hat, self.cfg.routing_iterations, detach=self.cfg.detach_routing)


class Decoder(nn.Module):
    """Reconstruct the image from the class capsules with all but one capsule masked to zero (section 4.1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sizes = [cfg.num_classes * cfg.units, *cfg.decoder_hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], cfg.in_channels * cfg.image_size * cfg.image_size), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, capsules: Tensor, keep: Tensor) -> Tensor:   # capsules: (B, K, D_out), keep: (B,) class index
        mask = F.one_hot(keep, capsules.shape[1]).to(capsules.dtype)  # (B, K)
        return self.net((capsules * mask.unsqueeze(-1)).flatten(1))   # (B, C*H*W)


class CapsNet(nn.Module):
    """DR-CapsNet built from a ``ModelConfig``. ``forward(x, y)`` masks the decoder input by the true label ``y``
    in training mode and by the longest capsule in evaluation mode (or when ``y`` is None)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv_channels, kernel_size=cfg.conv_kernel)
        self.primary = PrimaryCaps(cfg.conv_channels, cfg.primary_types, cfg.primary_dim,
                                   cfg.primary_kernel, cfg.primary_stride)
        self.digits = DigitCaps(cfg)
        self.decoder = Decoder(cfg) if cfg.decoder else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> CapsNetOutput:   # x: (B, C, H, W)
        h = F.relu(self.conv1(x))                                   # (B, conv_channels, H-k+1, W-k+1)
        u = self.primary(h)                                         # (B, N_in, D_in)
        v, coupling = self.digits(u)                                # (B, K, D_out), (B, N_in, K)
        lengths = v.norm(dim=-1)                                    # (B, K)
        reconstruction = None
        if self.decoder is not None:
            keep = y if (self.training and y is not None) else lengths.argmax(dim=1)
            reconstruction = self.decoder(v, keep)                  # (B, C*H*W)
        return CapsNetOutput(lengths, v, reconstruction, coupling)


class CapsNetClassifier(nn.Module):
    """``x (B, C, H, W) -> class-capsule lengths (B, K)``: the plain tensor-in, tensor-out view of a ``CapsNet``
    that model registries and serving need."""

    def __init__(self, capsnet: CapsNet) -> None:
        super().__init__()
        self.capsnet = capsnet

    def forward(self, x: Tensor) -> Tensor:
        return self.capsnet(x).lengths


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
