"""drcapsnet.data: splits, IDX reading, error messages, batching and the random-shift augmentation."""

from __future__ import annotations

import gzip
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from drcapsnet.config import DataConfig
from drcapsnet.data import (
    DataError,
    Datasets,
    Split,
    iterate_batches,
    load_datasets,
    num_batches,
    random_shift,
    read_idx,
    stratified_split,
)

MNIST_TEST = Path(__file__).resolve().parents[3] / "shared/data/mnist-test"   # ../shared beside the repo root
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # from its README


def write_idx(path: Path, array: np.ndarray) -> None:
    """A minimal IDX writer, independent of the reader under test; gzipped when the name ends in .gz."""
    code = {np.dtype("u1"): 0x08, np.dtype("i4"): 0x0C}[array.dtype]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def fake_images(n: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct uint8 images (pixel 0 holds the index) and balanced labels 0..2."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images, (np.arange(n) % 3).astype(np.uint8)


def rows(split: Split) -> list[bytes]:
    """Each (image, label) as bytes: compares splits as multisets of examples."""
    return [img.numpy().tobytes() + bytes([int(lab)]) for img, lab in zip(split.images, split.labels, strict=True)]


def class_counts(labels: torch.Tensor, num_classes: int = 10) -> np.ndarray:
    return torch.bincount(labels, minlength=num_classes).numpy()


# --- stratified_split -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.2), (0.9, 0.1), (0.5, 0.5), (1.0,)])
def test_stratified_split_is_a_partition_with_exact_sizes_and_class_proportions(fractions: tuple[float, ...]):
    labels = torch.tensor([0] * 500 + [1] * 230 + [2] * 67 + [3] * 3)[torch.randperm(800)]
    parts = stratified_split(labels, fractions, seed=3)
    assert len(parts) == len(fractions)
    merged = torch.cat(parts)
    assert torch.equal(merged.sort().values, torch.arange(800))             # disjoint and covers every index
    assert [len(p) for p in parts] == [round(sum(fractions[:i + 1]) * 800) - round(sum(fractions[:i]) * 800)
                                       for i in range(len(fractions))]
    total = class_counts(labels, 4)
    for part, f in zip(parts, fractions, strict=True):
        assert part.dtype == torch.int64
        assert np.all(np.abs(class_counts(labels[part], 4) - f * total) <= 1.5), (f, class_counts(labels[part], 4))


def test_stratified_split_is_deterministic_given_seed():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    a, b, c = stratified_split(labels, (0.6, 0.2, 0.2), seed=7), stratified_split(labels, (0.6, 0.2, 0.2), seed=7), \
        stratified_split(labels, (0.6, 0.2, 0.2), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.0, 1.0), (1.2, -0.2), ()])
def test_stratified_split_rejects_fractions_that_do_not_partition(fractions: tuple[float, ...]):
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(torch.zeros(10, dtype=torch.long), fractions, seed=0)


# --- digits ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits() -> Datasets:
    return load_datasets(DataConfig(dataset="digits", val_fraction=0.1, test_fraction=0.2, split_seed=0))


def test_digits_shapes_and_metadata(digits: Datasets):
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split.images),)
    assert (digits.in_channels, digits.image_size, digits.num_classes) == (1, 28, 10)
    assert int(digits.train.images.max()) == 255 and int(digits.train.images.min()) == 0  # 0..16 scaled to 0..255


def test_digits_read_from_the_file_equal_scikit_learns_load_digits(monkeypatch: pytest.MonkeyPatch):
    """drcaps reads scikit-learn's digits file itself (importing scikit-learn costs ~1.6 s per search and trial):
    the same images and labels as ``load_digits``, and the same again when only ``load_digits`` is there."""
    import importlib.util

    from sklearn.datasets import load_digits

    from drcapsnet.data import digits_arrays
    bunch = load_digits()
    pixels, labels = digits_arrays()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(labels, bunch.target)
    assert labels.dtype == np.int64 and pixels.shape == (1797, 8, 8)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else
                        real_find_spec(name, *a))                      # the file not found: the fallback
    pixels2, labels2 = digits_arrays()
    assert np.array_equal(pixels2, bunch.images) and np.array_equal(labels2, bunch.target)


def test_digits_splits_are_disjoint_cover_all_1797_and_keep_class_proportions(digits: Datasets):
    from sklearn.datasets import load_digits
    all_rows = rows(digits.train) + rows(digits.val) + rows(digits.test)
    assert len(all_rows) == 1797 and len(set(all_rows)) == 1797            # the 1,797 digits are all distinct
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1797 - 539, 539 - 359, 359)
    total = np.bincount(load_digits().target, minlength=10)
    for split, f in ((digits.train, 0.7), (digits.val, 0.1), (digits.test, 0.2)):
        counts = class_counts(split.labels)
        assert np.all(np.abs(counts - f * total) <= 2), (f, counts, f * total)
    assert np.array_equal(class_counts(torch.cat([digits.train.labels, digits.val.labels, digits.test.labels])), total)


def test_digits_split_depends_only_on_split_seed(digits: Datasets):
    same = load_datasets(DataConfig(dataset="digits", split_seed=0, shift_pixels=0, batch_size=7))
    other = load_datasets(DataConfig(dataset="digits", split_seed=1))
    for a, b in ((digits.train, same.train), (digits.val, same.val), (digits.test, same.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert set(rows(digits.test)) != set(rows(other.test))


def test_limit_train_keeps_a_stratified_subset_and_leaves_val_and_test_alone(digits: Datasets):
    limited = load_datasets(DataConfig(dataset="digits", split_seed=0, limit_train=100))
    assert len(limited.train) == 100
    assert set(rows(limited.train)) <= set(rows(digits.train))
    assert np.all(np.abs(class_counts(limited.train.labels) - 10) <= 2)   # digits are near-balanced: ~10 a class
    assert torch.equal(limited.val.images, digits.val.images) and torch.equal(limited.test.labels, digits.test.labels)
    assert len(load_datasets(DataConfig(dataset="digits", limit_train=100_000)).train) == len(digits.train)


def test_fractions_that_leave_no_training_data_are_refused():
    # DataConfig refuses it where it is built, before any data is read.
    with pytest.raises(ValueError, match=r"data\.val_fraction \+ data\.test_fraction"):
        load_datasets(DataConfig(dataset="digits", val_fraction=0.5, test_fraction=0.5))


def test_datasets_to_moves_every_split(digits: Datasets):
    """To another device (PyTorch's "meta" device stands in for a GPU here): every tensor of every split moves,
    and shapes, dtypes and the class count come along."""
    moved = digits.to(torch.device("meta"))
    assert isinstance(moved, Datasets) and moved.num_classes == digits.num_classes
    for before, after in zip((digits.train, digits.val, digits.test), (moved.train, moved.val, moved.test)):
        assert after.images.device.type == after.labels.device.type == "meta"
        assert after.images.shape == before.images.shape and after.images.dtype == torch.uint8
        assert before.images.device.type == "cpu"                      # the original is left where it was


def test_split_rejects_float_images_and_mismatched_labels():
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        Split(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


# --- IDX ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not MNIST_TEST.is_dir(), reason=f"real MNIST test set not at {MNIST_TEST}")
def test_real_mnist_test_set_is_split_three_ways_with_class_proportions():
    data = load_datasets(DataConfig(dataset="idx", data_dir=str(MNIST_TEST), val_fraction=0.1, test_fraction=0.2))
    assert (len(data.train), len(data.val), len(data.test)) == (7000, 1000, 2000)
    assert (data.in_channels, data.image_size, data.num_classes) == (1, 28, 10)
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.images.dtype == torch.uint8
    total = np.array(MNIST_TEST_COUNTS)
    merged = torch.cat([data.train.labels, data.val.labels, data.test.labels])
    assert np.array_equal(class_counts(merged), total)
    for split, f in ((data.train, 0.7), (data.val, 0.1), (data.test, 0.2)):
        assert np.all(np.abs(class_counts(split.labels) - f * total) <= 2)
    assert len(set(rows(data.train)) | set(rows(data.val)) | set(rows(data.test))) == 10_000


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_t10k_only_folder_round_trips_exactly(tmp_path: Path, suffix: str):
    images, labels = fake_images(60)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels)
    assert np.array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    data = load_datasets(DataConfig(dataset="idx", data_dir=str(tmp_path), val_fraction=0.2, test_fraction=0.3))
    assert (len(data.train), len(data.val), len(data.test)) == (30, 12, 18)
    assert (data.in_channels, data.image_size, data.num_classes) == (1, 6, 3)
    expected = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True))
    assert sorted(rows(data.train) + rows(data.val) + rows(data.test)) == expected


def test_idx_folder_with_train_and_t10k_uses_t10k_as_test(tmp_path: Path):
    train_images, train_labels = fake_images(50, seed=1)
    test_images, test_labels = fake_images(9, seed=2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels.astype(np.int32))  # big-endian int32 labels
    data = load_datasets(DataConfig(dataset="idx", data_dir=str(tmp_path), val_fraction=0.2))
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(test_images))
    assert torch.equal(data.test.labels, torch.from_numpy(test_labels.astype(np.int64)))
    assert (len(data.train), len(data.val)) == (40, 10)
    expected = sorted(img.tobytes() + bytes([lab]) for img, lab in zip(train_images, train_labels, strict=True))
    assert sorted(rows(data.train) + rows(data.val)) == expected


def _truncated_plain(d: Path) -> None:
    images, labels = fake_images(10)
    write_idx(d / "t10k-images-idx3-ubyte", images)
    write_idx(d / "t10k-labels-idx1-ubyte", labels)
    raw = (d / "t10k-images-idx3-ubyte").read_bytes()
    (d / "t10k-images-idx3-ubyte").write_bytes(raw[:-7])


def _truncated_gzip(d: Path) -> None:
    images, labels = fake_images(10)
    write_idx(d / "t10k-images-idx3-ubyte.gz", images)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", labels)
    raw = (d / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[: len(raw) // 2])


def _trailing_bytes(d: Path) -> None:
    images, labels = fake_images(10)
    write_idx(d / "t10k-images-idx3-ubyte", images)
    write_idx(d / "t10k-labels-idx1-ubyte", labels)
    with (d / "t10k-labels-idx1-ubyte").open("ab") as f:
        f.write(b"\x00\x01")


def _bad_magic(d: Path) -> None:
    (d / "t10k-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    write_idx(d / "t10k-labels-idx1-ubyte", fake_images(10)[1])


def _labels_missing(d: Path) -> None:
    write_idx(d / "t10k-images-idx3-ubyte", fake_images(10)[0])


def _count_mismatch(d: Path) -> None:
    write_idx(d / "t10k-images-idx3-ubyte", fake_images(10)[0])
    write_idx(d / "t10k-labels-idx1-ubyte", fake_images(11)[1])


@pytest.mark.parametrize("make, names", [
    (lambda d: d.rmdir(), ["does not exist", "--data-dir"]),
    (lambda d: None, ["no train-*/t10k-*", "--data-dir"]),
    (_truncated_plain, ["t10k-images-idx3-ubyte", "truncated"]),
    (_truncated_gzip, ["t10k-labels-idx1-ubyte.gz"]),
    (_trailing_bytes, ["t10k-labels-idx1-ubyte", "corrupt"]),
    (_bad_magic, ["t10k-images-idx3-ubyte", "not an IDX file"]),
    (_labels_missing, ["t10k-images-idx3-ubyte", "t10k-labels"]),
    (_count_mismatch, ["t10k-labels-idx1-ubyte", "10 images"]),
], ids=["missing-dir", "empty-dir", "truncated", "truncated-gzip", "trailing-bytes", "bad-magic", "labels-missing",
        "count-mismatch"])
def test_bad_idx_folder_raises_one_line_data_error_naming_the_path(tmp_path: Path, make, names: list[str]):
    folder = tmp_path / "idx"
    folder.mkdir()
    make(folder)
    with pytest.raises(DataError) as err:
        load_datasets(DataConfig(dataset="idx", data_dir=str(folder)))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.data_dir: ") and str(folder) in message
    for name in names:
        assert name in message


# --- torchvision, offline -------------------------------------------------------------------------------------

def _offline(host: str = "ossci-datasets.s3.amazonaws.com", timeout: float = 2.0) -> bool:
    """True when ``host`` does not resolve within ``timeout`` s (a hanging resolver counts as offline)."""
    resolved: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443)
            resolved.append(True)
        except OSError:
            resolved.append(False)

    thread = threading.Thread(target=look_up, daemon=True)
    thread.start()
    thread.join(timeout)
    return resolved != [True]


def _assert_helpful(message: str, dataset: str, root: Path) -> None:
    assert "\n" not in message
    for needle in (f"'{dataset}'", str(root), "--data-dir", "--dataset digits"):
        assert needle in message, (needle, message)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "kmnist", "cifar10"])
def test_torchvision_dataset_missing_without_download_says_how_to_fix(tmp_path: Path, dataset: str):
    with pytest.raises(DataError) as err:
        load_datasets(DataConfig(dataset=dataset, data_dir=str(tmp_path), download=False))
    _assert_helpful(str(err.value), dataset, tmp_path.resolve())


@pytest.mark.skipif(not _offline(), reason="network available: this test checks the offline download failure")
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_torchvision_download_offline_fails_with_data_error(tmp_path: Path, dataset: str):
    root = tmp_path / "root"
    with pytest.raises(DataError, match="could not download") as err:
        load_datasets(DataConfig(dataset=dataset, data_dir=str(root), download=True))
    _assert_helpful(str(err.value), dataset, root.resolve())


# --- batching -------------------------------------------------------------------------------------------------

def id_split(n: int = 23, size: int = 5) -> Split:
    """Random images whose labels are their own indices, so a batch tells which examples it holds."""
    images = torch.randint(0, 256, (n, 2, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(images, torch.arange(n))


@pytest.mark.parametrize("n, batch_size, expected", [(10, 3, 4), (9, 3, 3), (0, 3, 0), (1, 128, 1)])
def test_num_batches_counts_the_last_partial_batch(n: int, batch_size: int, expected: int):
    assert num_batches(n, batch_size) == expected


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_appears_once_per_epoch_and_last_batch_is_kept(shuffle: bool):
    split = id_split(23)
    batches = list(iterate_batches(split, 5, shuffle=shuffle, generator=torch.Generator().manual_seed(1)))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3] and len(batches) == num_batches(23, 5)
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, torch.arange(23))
    assert torch.equal(seen, torch.arange(23)) != shuffle                   # shuffled order differs from 0..22
    for x, y in batches:                                                    # images travel with their labels
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, split.images[y].float() / 255, rtol=0, atol=0)


def test_seeded_generator_gives_the_same_order_and_shifts():
    split = id_split(40, size=8)

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(iterate_batches(split, 16, shuffle=True, generator=torch.Generator().manual_seed(seed),
                                    shift_pixels=2))

    a, b, c = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))


def _naive_shift(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Reference: out[:, y, x] = image[:, y - dy, x - dx], zero outside; one image at a time."""
    out = torch.zeros_like(image)
    _, h, w = image.shape
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[:, y, x] = image[:, y - dy, x - dx]
    return out


def test_random_shift_matches_a_per_image_reference():
    images = torch.randint(0, 256, (6, 2, 7, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shifts = torch.tensor([[0, 0], [1, 0], [0, -1], [-3, 2], [3, 3], [-2, -3]])   # (dx, dy)
    out = random_shift(images, shifts)
    assert out.shape == images.shape and out.dtype == images.dtype
    for b, (dx, dy) in enumerate(shifts.tolist()):
        assert torch.equal(out[b], _naive_shift(images[b], dx, dy)), (dx, dy)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shift_moves_a_bright_pixel_by_at_most_k_and_uses_every_offset(k: int):
    n, size, centre = 400, 11, 5
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, 0, centre, centre] = 255
    split = Split(images, torch.zeros(n, dtype=torch.long))
    x = torch.cat([x for x, _ in iterate_batches(split, 64, shuffle=True, generator=torch.Generator().manual_seed(0),
                                                 shift_pixels=k)])
    assert x.shape == (n, 1, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x.flatten(1).sum(1), torch.ones(n))                 # the pixel moved, nothing else changed
    where = x.flatten(1).argmax(1)
    dy, dx = where // size - centre, where % size - centre
    assert int(dx.abs().max()) == k and int(dy.abs().max()) == k
    offsets = set(zip(dx.tolist(), dy.tolist(), strict=True))
    assert offsets == {(i, j) for i in range(-k, k + 1) for j in range(-k, k + 1)}  # 400 draws hit every offset


def test_shift_zero_is_the_image_over_255():
    split = id_split(10)
    x, y = next(iterate_batches(split, 10, shuffle=False, shift_pixels=0))
    assert torch.equal(x, split.images.float() / 255) and torch.equal(y, split.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches_for_the_same_seed():
    split = id_split(50, size=9)
    cuda = torch.device("cuda")

    def epoch(s: Split, device: torch.device | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(iterate_batches(s, 16, shuffle=True, generator=torch.Generator().manual_seed(3), shift_pixels=2,
                                    device=device))

    on_cpu = epoch(split, None)
    for other in (epoch(split.to(cuda), None), epoch(split, cuda)):
        for (xc, yc), (xg, yg) in zip(on_cpu, other, strict=True):
            assert xg.device.type == "cuda"
            # Same order and shifts, so the same pixels; CUDA's x / 255 may round 1 ulp apart from the CPU's
            # (it multiplies by the reciprocal), hence compare the 0..255 pixel values, not the floats bit by bit.
            assert torch.equal((xc * 255).round(), (xg.cpu() * 255).round()) and torch.equal(yc, yg.cpu())
            assert torch.allclose(xc, xg.cpu(), rtol=0, atol=1e-6)
