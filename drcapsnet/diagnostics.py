"""Capsule diagnostics of a trained CapsNet: pure functions over a model and a batch, no state, no plotting.

Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules" (arXiv:1710.09829): routing by agreement should
sharpen the couplings over its iterations (Procedure 1, eq. 3), a class capsule's length is its class probability
(section 2), the decoder rebuilds the input from the predicted capsule (section 4.1), and moving one dimension of
that capsule by -0.25..0.25 in steps of 0.05 and decoding shows what the dimension encodes (section 5.1, figure 4).

Everything runs under ``torch.no_grad`` and leaves the model as it was: ``CapsNet.forward(x)`` without labels masks
the decoder by the longest capsule in either mode, and the model has no dropout or batch norm.

Shapes: B batch · C, H, W image · N_in primary capsules · K classes · D class-capsule dimension (``model.cfg.units``)
· T routing iterations · S perturbation steps (11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from drcapsnet.model import CapsNet
from drcapsnet.routing import attention_routing, dynamic_routing

PERTURBATIONS = torch.arange(-5, 6, dtype=torch.float32) * 0.05   # (S,) -0.25, -0.20, ..., 0.25 (section 5.1)


@torch.no_grad()
def votes(model: CapsNet, x: Tensor) -> Tensor:
    """The class-capsule votes ``u_hat_j|i`` (eq. 2) of a batch: ``x (B, C, H, W) -> (B, N_in, K, D)``."""
    h = F.relu(model.conv1(x))                                     # (B, conv_channels, H', W')
    return model.digits.votes(model.primary(h))                    # (B, N_in, K, D)


@torch.no_grad()
def coupling_per_iteration(model: CapsNet, x: Tensor) -> list[Tensor]:
    """The couplings each routing iteration uses: ``T`` tensors ``(B, N_in, K)``, iteration 1 first.

    Routing starts from zero logits for every example and is deterministic, so the couplings of iteration ``t``
    are the final couplings of the same routing run for ``t`` iterations: the model's own routing function is
    called with 1..T iterations instead of being copied here.
    """
    cfg = model.cfg
    u_hat = votes(model, x)                                        # (B, N_in, K, D)
    if cfg.routing == "attention":
        return [attention_routing(u_hat, t, prior=model.digits.prior)[1] for t in range(1, cfg.routing_iterations + 1)]
    return [dynamic_routing(u_hat, t)[1] for t in range(1, cfg.routing_iterations + 1)]


def coupling_entropy(coupling: Tensor, eps: float = 1e-12) -> Tensor:
    """Entropy in nats of each child's coupling over the K parents: ``(..., K) -> (...)``, in ``[0, log K]``.

    The couplings are renormalised over the parents first: dynamic routing's already sum to 1, attention routing's
    sum to less (a child may abstain), and its entropy is that of where the child's vote goes.
    """
    p = coupling / coupling.sum(dim=-1, keepdim=True).clamp_min(eps)   # (..., K) sums to 1
    return -(p * p.clamp_min(eps).log()).sum(dim=-1)                    # (...)


@torch.no_grad()
def coupling_entropy_per_iteration(model: CapsNet, x: Tensor) -> Tensor:
    """Mean coupling entropy of each example's primary capsules at each routing iteration: ``(T, B)`` nats.

    Iteration 1 of dynamic routing is uniform coupling (entropy exactly ``log K``); lower values in later
    iterations mean routing sharpens: children commit to fewer parents.
    """
    return torch.stack([coupling_entropy(c).mean(dim=1) for c in coupling_per_iteration(model, x)])  # (T, B)


@torch.no_grad()
def capsule_lengths(model: CapsNet, x: Tensor) -> Tensor:
    """Class-capsule lengths, the class probabilities of the paper: ``x (B, C, H, W) -> (B, K)`` in [0, 1)."""
    return model(x).lengths


@torch.no_grad()
def reconstructions(model: CapsNet, x: Tensor) -> Tensor:
    """The decoder's image of each input from its predicted (longest) capsule: ``(B, C, H, W)`` in [0, 1]."""
    if model.decoder is None:
        raise ValueError("reconstructions: the model has no decoder (model.decoder: false)")
    out = model(x)
    return out.reconstruction.view(x.shape)                        # (B, C, H, W)


@torch.no_grad()
def perturbation_grid(model: CapsNet, x: Tensor, deltas: Tensor = PERTURBATIONS) -> Tensor:
    """Decode each example's predicted capsule with one dimension moved by each of ``deltas`` (section 5.1).

    ``x (B, C, H, W) -> (B, D, S, C, H, W)``: row ``d`` holds dimension ``d`` moved by ``deltas[0..S-1]``; the
    other class capsules stay masked out, as in the decoder's own evaluation-mode input.
    """
    if model.decoder is None:
        raise ValueError("perturbation_grid: the model has no decoder (model.decoder: false)")
    out = model(x)
    b, k, d = out.capsules.shape
    s = len(deltas)
    pred = out.lengths.argmax(dim=1)                               # (B,)
    offsets = torch.eye(d, device=x.device).unsqueeze(1) * deltas.to(x.device).view(1, s, 1)   # (D, S, D)
    caps = out.capsules.view(b, 1, 1, k, d).expand(b, d, s, k, d).clone()                      # (B, D, S, K, D)
    rows = torch.arange(b, device=x.device)
    caps[rows, :, :, pred] += offsets                              # only the predicted capsule moves
    images = model.decoder(caps.view(b * d * s, k, d), pred.repeat_interleave(d * s))   # (B*D*S, C*H*W)
    return images.view(b, d, s, *x.shape[1:])                      # (B, D, S, C, H, W)
