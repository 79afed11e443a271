"""Squash and routing between capsule layers: pure functions, no state.

Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules" (arXiv:1710.09829): eq. 1 (squash),
eq. 2 (votes and weighted sum), eq. 3 (coupling softmax), Procedure 1 (routing by agreement).

Shapes: B batch · N_in input (child) capsules · N_out output (parent) capsules · D_out parent dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Shrink each vector's length into [0, 1) and keep its direction (eq. 1).

    Written as ``s * |s|^2 / (1 + |s|^2) * rsqrt(|s|^2 + eps)`` so that a zero vector maps to zero with a finite
    gradient (the textbook ``s / |s|`` form is 0/0 there).
    """
    sq_norm = (s * s).sum(dim=dim, keepdim=True)                    # (..., 1)
    return s * (sq_norm / (1.0 + sq_norm)) * torch.rsqrt(sq_norm + eps)  # same shape as s


def dynamic_routing(u_hat: Tensor, num_iterations: int, *, detach: bool = True) -> tuple[Tensor, Tensor]:
    """Routing by agreement (Procedure 1): ``u_hat (B, N_in, N_out, D_out) -> v (B, N_out, D_out), c (B, N_in, N_out)``.

    Logits start at zero for every example; each child splits its vote over the parents with a softmax over the
    PARENT axis (eq. 3); parents are the squashed coupling-weighted sums of votes (eq. 2); logits grow by the
    agreement ``<u_hat_j|i, v_j>``. Exactly ``num_iterations`` squash passes; 1 iteration is uniform coupling.

    ``detach`` (default True): in all but the last iteration the votes are detached, so the gradient reaches the
    votes only through the final weighted sum and the couplings act as a non-differentiated inner loop. This is
    what the authors' reference code does (``tf.stop_gradient`` on the votes in the routing loop); it keeps
    backward cost and memory independent of the iteration count and avoids the unstable gradients that flow
    through repeated softmax-of-agreement otherwise. ``detach=False`` backpropagates through every iteration.
    Returns the parents and the final couplings (for inspection and tests).
    """
    if num_iterations < 1:
        raise ValueError(f"model.routing_iterations: must be >= 1, got {num_iterations}")
    u_hat_routing = u_hat.detach() if detach else u_hat                       # (B, N_in, N_out, D_out)
    batch, n_in, n_out, _ = u_hat.shape
    # Logits parent-major: PyTorch's CPU softmax over a last axis of N_out = 10 ran 15-19x slower than over this
    # middle axis (vectorised along N_in); votes + routing, forward + backward, ran 1.6-2x faster so (measured).
    b = u_hat.new_zeros(batch, n_out, n_in)                                    # (B, N_out, N_in) logits
    for i in range(num_iterations):
        last = i == num_iterations - 1
        votes = u_hat if last else u_hat_routing
        c = b.softmax(dim=1)                                                   # (B, N_out, N_in) sums to 1 over parents
        s = torch.einsum("bji,bijd->bjd", c, votes)                            # (B, N_out, D_out)
        v = squash(s)                                                          # (B, N_out, D_out)
        if not last:
            b = b + torch.einsum("bijd,bjd->bji", votes, v)                    # (B, N_out, N_in) agreement
    return v, c.transpose(1, 2)                                                # c as (B, N_in, N_out)


def attention_routing(
    u_hat: Tensor, num_iterations: int, *, prior: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Attention routing: ``u_hat (B, N_in, N_out, D_out) -> v (B, N_out, D_out), a (B, N_in, N_out)``.

    Each parent j has a query, first the plain sum of its votes ``q_j = sum_i u_hat_j|i``, then its squashed output
    ``v_j`` in later iterations. Logits are scaled dot products ``b_ij = <u_hat_j|i, q_j> / sqrt(D_out)`` (+ an
    optional learnable ``prior`` of shape (N_in, N_out)); the coupling ``a_ij = exp(b_ij) / (sum_k exp(b_ik) + eps)``
    lets a child abstain when it agrees with no parent. It is computed stably as
    ``exp(b_ij - logsumexp(b_i1..b_iK, log eps))`` (the ``eps`` term is an extra "null" logit). Parents aggregate
    the weighted votes: ``v_j = squash(sum_i a_ij u_hat_j|i)``. Exactly ``num_iterations`` squash passes.
    """
    if num_iterations < 1:
        raise ValueError(f"model.routing_iterations: must be >= 1, got {num_iterations}")
    scale = 1.0 / math.sqrt(u_hat.shape[-1])
    q = u_hat.sum(dim=1)                                                       # (B, N_out, D_out)
    log_eps = u_hat.new_full(u_hat.shape[:2] + (1,), math.log(eps))            # (B, N_in, 1) the null logit
    for _ in range(num_iterations):
        b = torch.einsum("bijd,bjd->bij", u_hat, q) * scale                    # (B, N_in, N_out)
        if prior is not None:
            b = b + prior                                                      # (N_in, N_out) broadcast over B
        log_z = torch.logsumexp(torch.cat([b, log_eps], dim=2), dim=2, keepdim=True)  # (B, N_in, 1)
        a = torch.exp(b - log_z)                                               # (B, N_in, N_out) sums to < 1
        v = squash(torch.einsum("bij,bijd->bjd", a, u_hat))                    # (B, N_out, D_out)
        q = v
    return v, a
