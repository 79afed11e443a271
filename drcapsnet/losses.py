"""Margin and reconstruction losses of DR-CapsNet: pure functions.

Sabour, Frosst & Hinton 2017, eq. 4 (margin loss, m+ = 0.9, m- = 0.1, lambda = 0.5, summed over classes) and
section 4.1 (reconstruction: sum of squared errors per image, scaled down by 0.0005).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def margin_loss(lengths: Tensor, labels: Tensor, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5) -> Tensor:
    """Eq. 4, summed over classes and averaged over the batch. ``lengths (B, K)``, ``labels (B,)`` int."""
    target = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)                   # (B, K)
    present = target * F.relu(m_pos - lengths).pow(2)                                # (B, K)
    absent = lam * (1.0 - target) * F.relu(lengths - m_neg).pow(2)                   # (B, K)
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(reconstruction: Tensor, images: Tensor) -> Tensor:
    """Sum of squared errors per image, averaged over the batch.

    ``reconstruction (B, C*H*W)``, ``images (B, C, H, W)``."""
    return (reconstruction - images.flatten(1)).pow(2).sum(dim=1).mean()


def capsnet_loss(
    lengths: Tensor, reconstruction: Tensor | None, images: Tensor, labels: Tensor, reconstruction_weight: float
) -> Tensor:
    """Total loss: margin loss + ``reconstruction_weight`` x reconstruction loss (0.0005 in the paper)."""
    loss = margin_loss(lengths, labels)
    if reconstruction is not None and reconstruction_weight > 0:
        loss = loss + reconstruction_weight * reconstruction_loss(reconstruction.float(), images)
    return loss
