"""What a loaded dataset is (``Split``, ``Datasets``) and the split rule, seeded by ``data.split_seed`` (``train.seed``
does not touch it):

- a dataset with a test split (torchvision, IDX with ``train-*`` files): test is that split; val is a stratified
  ``val_fraction`` of the training split; train is the rest.
- a dataset without one (``digits``, IDX with only ``t10k-*`` files or only ``train-*`` files): one stratified
  three-way split of all N images: test gets ``round(test_fraction * N)``, val ``round(val_fraction * N)`` (a
  fraction of the whole, not of what is left), train the rest.
- ``limit_train``: train is then cut to a stratified subset of exactly ``limit_train`` images; val and test are
  unchanged, so runs with different limits are scored on the same images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from drcapsnet.config import DataConfig
from drcapsnet.errors import DataError


@dataclass(frozen=True)
class Split:
    """One split of a dataset. Images stay uint8 (a quarter of float32's memory) until ``iterate_batches``."""

    images: Tensor   # (N, C, H, W) uint8
    labels: Tensor   # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"Split.images: expected a (N, C, H, W) uint8 tensor, got {self.images.dtype} "
                             f"of shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"Split.labels: expected a ({len(self.images)},) int64 tensor, got {self.labels.dtype} "
                             f"of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Datasets:
    """Train, validation and test splits with what the model needs to know about them."""

    train: Split
    val: Split
    test: Split
    in_channels: int
    image_size: int
    num_classes: int

    def to(self, device: torch.device) -> Datasets:
        """All tensors on ``device``: small datasets live on the training device for the whole run."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device),
                                   test=self.test.to(device))


def stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> tuple[Tensor, ...]:
    """Split ``range(len(labels))`` into ``len(fractions)`` disjoint parts that together cover every index.

    ``fractions`` are positive and sum to 1. Part ``i`` gets exactly ``round(cum[i] * N) - round(cum[i-1] * N)``
    indices (``cum`` the running sum), and each class is spread over the parts in the same proportions, to within
    one image per class and part. How: shuffle each class with ``seed``, give the ``r``-th of a class's ``n_c``
    images the key ``(r + 0.5) / n_c``, sort all images by key (ties in shuffled order), and cut the sorted list
    into consecutive parts. Deterministic given ``seed``; each part is returned sorted ascending (int64).
    """
    if len(fractions) < 1 or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"stratified_split: fractions must be positive and sum to 1, got {list(fractions)!r}")
    labels = labels.detach().cpu().long()                                 # (N,)
    n = len(labels)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)                               # (N,) random order
    order = perm[torch.argsort(labels[perm], stable=True)]                # (N,) grouped by class, shuffled within
    _, counts = torch.unique(labels[order], return_counts=True)           # (K,) images per class
    starts = torch.cumsum(counts, 0) - counts                             # (K,) first position of each class
    class_of = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (N,) class index at each position
    rank = torch.arange(n) - starts[class_of]                             # (N,) rank within its class
    key = (rank.double() + 0.5) / counts[class_of].double()               # (N,) in (0, 1), evenly spread per class
    interleaved = order[torch.argsort(key, stable=True)]                  # (N,) classes evenly interleaved
    cuts = [0] + [round(c * n) for c in np.cumsum(fractions)[:-1].tolist()] + [n]
    return tuple(interleaved[a:b].sort().values for a, b in zip(cuts[:-1], cuts[1:], strict=True))



def subset(split: Split, index: Tensor) -> Split:
    return Split(split.images[index], split.labels[index])


def split_train_val(train: Split, cfg: DataConfig) -> tuple[Split, Split]:
    """Hold a stratified ``val_fraction`` of ``train`` out for validation."""
    train_idx, val_idx = stratified_split(train.labels, (1.0 - cfg.val_fraction, cfg.val_fraction), cfg.split_seed)
    return subset(train, train_idx), subset(train, val_idx)


def split_three_ways(data: Split, cfg: DataConfig, what: str) -> tuple[Split, Split, Split]:
    """Train/val/test from one split: test ``test_fraction`` and val ``val_fraction`` of the whole."""
    rest = 1.0 - cfg.val_fraction - cfg.test_fraction
    if rest <= 0.05:
        raise DataError(f"data.val_fraction + data.test_fraction: {cfg.val_fraction} + {cfg.test_fraction} leaves "
                        f"{max(rest, 0.0):.0%} of {what} for training; make their sum at most 0.95")
    parts = stratified_split(data.labels, (rest, cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
    train, val, test = (subset(data, idx) for idx in parts)
    return train, val, test


def limit_train(train: Split, limit: int | None, seed: int) -> Split:
    """A stratified subset of exactly ``limit`` training images (all of them when ``limit`` is None or larger)."""
    n = len(train)
    if limit is None or limit >= n:
        return train
    keep, _ = stratified_split(train.labels, (limit / n, 1.0 - limit / n), seed)
    return subset(train, keep)
