"""Images in, ``(x, y)`` batches out: loading, seeded stratified splits, batching with random shifts.

Every dataset is loaded whole into uint8 tensors (MNIST's 60,000 training images are 47 MB), so a small dataset can
live on the training device and batching is plain tensor indexing, with no DataLoader workers. Images become float
in [0, 1] one batch at a time. The only augmentation is the paper's random shift by up to ``k`` pixels with zero
padding (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules", section 5).

Sources (``DataConfig.dataset``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16) scaled to 0..255 and
  resized to 28x28 (bilinear). Needs no network.
- ``idx``: a folder (``data_dir``) of ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` files, each gzipped (``.gz``) or not.
- ``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``: torchvision, downloaded into ``data_dir`` (default
  ``~/.cache/drcaps/data``, see ``DEFAULT_ROOT``) when ``download`` is true.

Split rule (``split_seed`` fixes it; ``train.seed`` does not touch it):

- a dataset with a test split (torchvision, IDX with ``train-*`` files): test is that split; val is a stratified
  ``val_fraction`` of the training split; train is the rest.
- a dataset without one (``digits``, IDX with only ``t10k-*`` files or only ``train-*`` files): one stratified
  three-way split of all N images: test gets ``round(test_fraction * N)``, val ``round(val_fraction * N)`` (a
  fraction of the whole, not of what is left), train the rest.
- ``limit_train``: train is then cut to a stratified subset of exactly ``limit_train`` images; val and test are
  unchanged, so runs with different limits are scored on the same images.

Shapes: N images · B batch · C channels · H, W height and width (H == W).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from drcapsnet.config import DataConfig
from drcapsnet.errors import DataError

DEFAULT_ROOT = Path("~/.cache/drcaps/data")   # torchvision root when data.data_dir is not set
DIGITS_SIZE = 28                              # digits are resized to MNIST's size so the paper's network fits

_IDX_HINT = "pass --data-dir pointing at a folder of train-*/t10k-* IDX files"
# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): all big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
                                    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


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


# --- splitting -------------------------------------------------------------------------------------------------

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


def _subset(split: Split, index: Tensor) -> Split:
    return Split(split.images[index], split.labels[index])


def _split_train_val(train: Split, cfg: DataConfig) -> tuple[Split, Split]:
    """Hold a stratified ``val_fraction`` of ``train`` out for validation."""
    train_idx, val_idx = stratified_split(train.labels, (1.0 - cfg.val_fraction, cfg.val_fraction), cfg.split_seed)
    return _subset(train, train_idx), _subset(train, val_idx)


def _split_three_ways(data: Split, cfg: DataConfig, what: str) -> tuple[Split, Split, Split]:
    """Train/val/test from one split: test ``test_fraction`` and val ``val_fraction`` of the whole."""
    rest = 1.0 - cfg.val_fraction - cfg.test_fraction
    if rest <= 0.05:
        raise DataError(f"data.val_fraction + data.test_fraction: {cfg.val_fraction} + {cfg.test_fraction} leaves "
                        f"{max(rest, 0.0):.0%} of {what} for training; make their sum at most 0.95")
    parts = stratified_split(data.labels, (rest, cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
    train, val, test = (_subset(data, idx) for idx in parts)
    return train, val, test


def _limit(train: Split, limit: int | None, seed: int) -> Split:
    """A stratified subset of exactly ``limit`` training images (all of them when ``limit`` is None or larger)."""
    n = len(train)
    if limit is None or limit >= n:
        return train
    keep, _ = stratified_split(train.labels, (limit / n, 1.0 - limit / n), seed)
    return _subset(train, keep)


# --- sources ---------------------------------------------------------------------------------------------------

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64)``, exactly
    what ``sklearn.datasets.load_digits()`` returns, read from the file it reads (``sklearn/datasets/data/
    digits.csv.gz``: 64 pixel values and the label per row) without importing scikit-learn, which takes ~1.6 s on
    the path of every search and trial (issue 9). Falls back to ``load_digits`` where the file is not there."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")           # finds the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")          # (1797, 65)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def _load_digits() -> Split:
    """scikit-learn's 1,797 bundled 8x8 digits (values 0..16) as (1797, 1, 28, 28) uint8."""
    pixels, labels = digits_arrays()
    x = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8) in [0, 255]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)  # (N, 1, 28, 28)
    images = x.round().clamp(0, 255).to(torch.uint8)
    return Split(images, torch.as_tensor(labels, dtype=torch.int64))


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped when its name ends in ``.gz``) as a native-endian array; DataError if malformed.

    Format: two zero bytes, a type code, the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the
    data, big-endian, row-major.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:   # BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DataError(f"data.data_dir: cannot read {path} ({type(e).__name__}: {e}); "
                        "re-download it or remove it from the folder") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"data.data_dir: {path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'}); "
                        "re-download it or remove it from the folder")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data.data_dir: {path} is truncated (header cut short); re-download it")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"data.data_dir: {path} is truncated or corrupt (shape {shape} needs {expected} bytes of "
                        f"data, found {len(raw) - header}); re-download it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    """``{prefix}-{kind}*`` in ``folder``, preferring an unzipped copy (torchvision keeps both)."""
    found = sorted((p for p in folder.glob(f"{prefix}-{kind}*") if p.is_file()), key=lambda p: (p.suffix == ".gz", p))
    return found[0] if found else None


def _read_idx_pair(folder: Path, prefix: str) -> Split | None:
    """The ``{prefix}-images``/``{prefix}-labels`` pair as a Split; None when neither file is there."""
    images_path, labels_path = _find_idx(folder, prefix, "images"), _find_idx(folder, prefix, "labels")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        have, missing = (images_path or labels_path), ("images" if images_path is None else "labels")
        raise DataError(f"data.data_dir: {have} has no matching {prefix}-{missing}-idx*-ubyte[.gz] in {folder}; "
                        "add the missing file")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"data.data_dir: {images_path} holds {images.dtype} of shape {images.shape}, expected uint8 "
                        "images (N, H, W); pass an idx3-ubyte images file")
    if images.shape[1] != images.shape[2]:
        raise DataError(f"data.data_dir: {images_path} holds {images.shape[1]}x{images.shape[2]} images; "
                        "the model needs square images")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images) or (labels < 0).any():
        raise DataError(f"data.data_dir: {labels_path} does not match {images_path} ({len(images)} images, labels "
                        f"{labels.dtype} of shape {labels.shape}); expected {len(images)} integer labels >= 0")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1),                  # (N, 1, H, W) uint8
                 torch.from_numpy(labels.astype(np.int64)))


def _load_idx(cfg: DataConfig) -> tuple[Split, Split, Split]:
    folder = Path(cfg.data_dir or "").expanduser().resolve()
    if not folder.exists():
        raise DataError(f"data.data_dir: {folder} does not exist; {_IDX_HINT}")
    if not folder.is_dir():
        raise DataError(f"data.data_dir: {folder} is not a folder; {_IDX_HINT}")
    train, test = _read_idx_pair(folder, "train"), _read_idx_pair(folder, "t10k")
    if train is None and test is None:
        raise DataError(f"data.data_dir: {folder} holds no train-*/t10k-* IDX files "
                        f"(e.g. t10k-images-idx3-ubyte.gz); {_IDX_HINT}")
    if train is not None and test is not None:
        if train.images.shape[1:] != test.images.shape[1:]:
            raise DataError(f"data.data_dir: train-* images in {folder} are {tuple(train.images.shape[2:])} but "
                            f"t10k-* images are {tuple(test.images.shape[2:])}; use files from one dataset")
        return (*_split_train_val(train, cfg), test)
    only = train if train is not None else test
    assert only is not None
    return _split_three_ways(only, cfg, str(folder))


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10"}


def _torchvision_root(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir if cfg.data_dir else DEFAULT_ROOT).expanduser().resolve()


def _short_reason(e: BaseException) -> str:
    """The last line of an exception's message (torchvision puts the network error there), kept short."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[-1] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def _load_torchvision_split(cfg: DataConfig, train: bool) -> Split:
    import torchvision  # lazy: digits and IDX need only torch

    root = _torchvision_root(cfg)
    cls = getattr(torchvision.datasets, _TORCHVISION[cfg.dataset])
    try:
        ds = cls(str(root), train=train, download=cfg.download)
    except Exception as e:  # RuntimeError, URLError, OSError...: any failure means "not here"; Ctrl-C still stops
        reason = _short_reason(e)
        if cfg.download:
            raise DataError(f"data.dataset: could not download {cfg.dataset!r} into {root} (offline?); download it "
                            f"elsewhere and pass --data-dir DIR, or use --dataset digits [{reason}]") from e
        raise DataError(f"data.dataset: {cfg.dataset!r} not found in {root} and data.download is false; pass "
                        f"--data-dir DIR holding it, allow downloading, or use --dataset digits [{reason}]") from e
    if cfg.dataset == "cifar10":
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    else:
        images = torch.as_tensor(ds.data, dtype=torch.uint8).unsqueeze(1)                         # (N, 1, 28, 28)
    return Split(images, torch.as_tensor(ds.targets, dtype=torch.int64))


def load_datasets(cfg: DataConfig) -> Datasets:
    """Load ``cfg.dataset`` and split it as the module docstring says; tensors on the CPU."""
    if cfg.dataset == "digits":
        train, val, test = _split_three_ways(_load_digits(), cfg, "the digits")
    elif cfg.dataset == "idx":
        train, val, test = _load_idx(cfg)
    elif cfg.dataset in _TORCHVISION:
        train, val = _split_train_val(_load_torchvision_split(cfg, train=True), cfg)
        test = _load_torchvision_split(cfg, train=False)
    else:  # DataConfig already rejects this; kept for a config built around its checks
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}; choose one of digits, idx, "
                        f"{', '.join(_TORCHVISION)}")
    train = _limit(train, cfg.limit_train, cfg.split_seed)
    num_classes = int(max(s.labels.max().item() for s in (train, val, test) if len(s)) + 1)
    if num_classes < 2:
        raise DataError(f"data.dataset: {cfg.dataset!r} has a single class; a classifier needs at least two")
    _, in_channels, image_size, _ = train.images.shape
    return Datasets(train, val, test, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


# --- batching --------------------------------------------------------------------------------------------------

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
