"""Where the images come from (``DataConfig.dataset``), and ``load_datasets``: a source, split.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16) scaled to 0..255 and
  resized to 28x28 (bilinear). Needs no network.
- ``idx``: a folder of IDX files (``drcapsnet.data.idx``).
- ``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``: torchvision, downloaded into ``data_dir`` (default
  ``~/.cache/drcaps/data``, see ``DEFAULT_ROOT``) when ``download`` is true.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from drcapsnet.config import DataConfig
from drcapsnet.data.idx import load_idx
from drcapsnet.data.splits import Datasets, Split, limit_train, split_three_ways, split_train_val
from drcapsnet.errors import DataError

DEFAULT_ROOT = Path("~/.cache/drcaps/data")   # torchvision root when data.data_dir is not set
DIGITS_SIZE = 28                              # digits are resized to MNIST's size so the paper's network fits


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
        train, val, test = split_three_ways(_load_digits(), cfg, "the digits")
    elif cfg.dataset == "idx":
        train, val, test = load_idx(cfg)
    elif cfg.dataset in _TORCHVISION:
        train, val = split_train_val(_load_torchvision_split(cfg, train=True), cfg)
        test = _load_torchvision_split(cfg, train=False)
    else:  # DataConfig already rejects this; kept for a config built around its checks
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}; choose one of digits, idx, "
                        f"{', '.join(_TORCHVISION)}")
    train = limit_train(train, cfg.limit_train, cfg.split_seed)
    num_classes = int(max(s.labels.max().item() for s in (train, val, test) if len(s)) + 1)
    if num_classes < 2:
        raise DataError(f"data.dataset: {cfg.dataset!r} has a single class; a classifier needs at least two")
    _, in_channels, image_size, _ = train.images.shape
    return Datasets(train, val, test, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
