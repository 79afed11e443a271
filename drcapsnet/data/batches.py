"""Batches of a ``Split``: ``(x, y)`` float images in [0, 1] and labels, shuffled from a seeded generator (so a
resumed run sees the same batches), with the paper's random shift (Sabour et al. 2017, section 5) as the one
augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from drcapsnet.data.splits import Split


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch over ``n`` examples; the last partial batch counts."""
    return -(-n // batch_size)


def random_shift(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift image ``b`` by ``shifts[b] = (dx, dy)`` pixels (right, down), filling with zeros; any dtype.

    images: (B, C, H, W); shifts: (B, 2) integers with ``|dx|, |dy| <= k``. One gather for the whole batch:
    ``out[b, :, y, x] = images[b, :, y - dy, x - dx]`` (zero where that falls outside).
    """
    b, c, h, w = images.shape
    k = int(shifts.abs().max().item()) if len(shifts) else 0
    if k == 0:
        return images
    padded = F.pad(images, (k, k, k, k))                                             # (B, C, H + 2k, W + 2k)
    shifts = shifts.to(images.device)
    rows = k - shifts[:, 1:2] + torch.arange(h, device=images.device)                # (B, H) source rows
    cols = k - shifts[:, 0:1] + torch.arange(w, device=images.device)                # (B, W) source cols
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    chan = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]        # (B, C, H, W)


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    shift_pixels: int = 0, device: torch.device | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches over ``split``: x (B, C, H, W) float32 in [0, 1], y (B,) int64; the last may be short.

    Every example appears exactly once per pass. ``shuffle``: the order is a permutation drawn from ``generator``
    (the global RNG when None), so a generator seeded the same way gives the same order (exact resume).
    ``shift_pixels = k > 0``: each image moves by its own random ``(dx, dy)`` in ``[-k, k]^2``, also drawn from
    ``generator``, with zero padding. Draws are made on the generator's device, so the same seed gives the same
    batches whether the split lives on the CPU or a GPU. Batches are on ``device`` (default: the split's device).
    """
    if batch_size < 1:
        raise ValueError(f"data.batch_size: must be an integer >= 1, got {batch_size!r}")
    n = len(split)
    rng_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(n, generator=generator, device=rng_device) if shuffle else None
    if order is not None:
        order = order.to(split.images.device)                                      # (N,)
    for start in range(0, n, batch_size):
        if order is None:
            x, y = split.images[start:start + batch_size], split.labels[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]                                  # (B,)
            x, y = split.images[idx], split.labels[idx]                            # (B, C, H, W) uint8, (B,)
        if device is not None:
            x, y = x.to(device), y.to(device)                                      # uint8: 1/4 of a float copy
        if shift_pixels > 0:
            shifts = torch.randint(-shift_pixels, shift_pixels + 1, (len(y), 2), generator=generator,
                                   device=rng_device)                              # (B, 2) (dx, dy)
            x = random_shift(x, shifts)
        yield x.float().div_(255.0), y                                             # (B, C, H, W) in [0, 1], (B,)
