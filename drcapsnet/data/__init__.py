"""Images in, ``(x, y)`` batches out: loading, seeded stratified splits, batching with random shifts.

Every dataset is loaded whole into uint8 tensors (MNIST's 60,000 training images are 47 MB), so a small dataset can
live on the training device and batching is plain tensor indexing, with no DataLoader workers. Images become float
in [0, 1] one batch at a time. The only augmentation is the paper's random shift by up to ``k`` pixels with zero
padding (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between Capsules", section 5).

The package, one concept a module: ``sources`` (where the images come from, and ``load_datasets``), ``idx`` (IDX
files), ``splits`` (``Split``, ``Datasets`` and the seeded stratified split rule), ``batches`` (batching and the
random shift). Everything a caller uses is importable from ``drcapsnet.data``.

Shapes: N images · B batch · C channels · H, W height and width (H == W).
"""

from __future__ import annotations

from drcapsnet.data.batches import iterate_batches, num_batches, random_shift
from drcapsnet.data.idx import read_idx
from drcapsnet.data.sources import DEFAULT_ROOT, DIGITS_SIZE, digits_arrays, load_datasets
from drcapsnet.data.splits import Datasets, Split, stratified_split
from drcapsnet.errors import DataError

__all__ = ["DEFAULT_ROOT", "DIGITS_SIZE", "DataError", "Datasets", "Split", "digits_arrays", "iterate_batches",
           "load_datasets", "num_batches", "random_shift", "read_idx", "stratified_split"]
