"""IDX files (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"), the format MNIST and its relatives ship in:
``data.dataset: idx`` reads a folder (``data_dir``) of ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` files, each gzipped (``.gz``) or not, and splits it as
``drcapsnet.data.splits`` says."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from drcapsnet.config import DataConfig
from drcapsnet.data.splits import Split, split_three_ways, split_train_val
from drcapsnet.errors import DataError

_IDX_HINT = "pass --data-dir pointing at a folder of train-*/t10k-* IDX files"
# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): all big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
                                    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}



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


def load_idx(cfg: DataConfig) -> tuple[Split, Split, Split]:
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
        return (*split_train_val(train, cfg), test)
    only = train if train is not None else test
    assert only is not None
    return split_three_ways(only, cfg, str(folder))
