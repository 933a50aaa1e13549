"""Tests for liftkit.data: dataset loading and verification, batching and input checks.

Tests that read the official MNIST / Fashion-MNIST files find them in $LIFTKIT_DATA_DIR, else in the
``shared/data`` folder next to the repository, and skip when they are not there. Everything else (CIFAR-10
included) runs on small files the tests write themselves.
"""

from __future__ import annotations

import email.message
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from liftkit import data
from liftkit.data import (
    DATASETS,
    batch_indices,
    check_inputs,
    dataset_status,
    load_dataset,
    one_hot,
    resolve_data_dir,
)
from liftkit.errors import DataError, LiftkitError

torch.set_num_threads(1)

SHARED = Path(os.environ.get("LIFTKIT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
IDX_FILES = data._IDX_FILES
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(name: str) -> Path:
    """The shared data dir, or skip the test when it lacks dataset ``name``."""
    if not all((SHARED / name / f).is_file() for f in IDX_FILES):
        pytest.skip(f"official {name} files not found under {SHARED} (set LIFTKIT_DATA_DIR)")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the network: downloads see a failing connection unless a test fakes one."""

    def no_network(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(data, "_urlopen", no_network)


@pytest.fixture(scope="module")
def mnist() -> data.Dataset:
    return load_dataset("mnist", _need("mnist"), download=False)


@pytest.fixture(scope="module")
def mnist_val() -> data.Dataset:
    return load_dataset("mnist", _need("mnist"), split="validation", download=False)


# ------------------------------------------------------------------------------------------ helpers


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return gzip.compress(struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes())


def _write_fake_idx_dataset(root: Path, name: str, n_train: int, n_test: int) -> dict[str, tuple[int, str]]:
    """Write tiny IDX files for ``name`` under root; return their real (size, md5) for _CHECKSUMS."""
    rng = np.random.default_rng(0)
    d = root / name
    d.mkdir(parents=True)
    sums = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        blobs = {
            f"{prefix}-images-idx3-ubyte.gz": _idx_bytes(rng.integers(0, 256, (n, 28, 28)), 2051),
            f"{prefix}-labels-idx1-ubyte.gz": _idx_bytes(np.arange(n) % 10, 2049),
        }
        for fname, blob in blobs.items():
            (d / fname).write_bytes(blob)
            sums[fname] = (len(blob), hashlib.md5(blob).hexdigest())
    return sums


def _link_official(tmp: Path, name: str, except_file: str) -> Path:
    """A data dir with symlinks to the official files of ``name``, except one file (returned, not created)."""
    d = tmp / name
    d.mkdir(parents=True)
    for f in IDX_FILES:
        if f != except_file:
            (d / f).symlink_to(_need(name) / name / f)
    return d / except_file


def _cifar_batch(n: int, seed: int, protocol: int = 2) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    # The official batches were written by Python 2's cPickle with protocol 2.
    return pickle.dumps(batch, protocol=protocol)


def _write_cifar_tar(path: Path, per_batch: int = 2, members: dict[str, bytes] | None = None) -> None:
    """Write a CIFAR-10 archive in the official layout with ``per_batch`` images per batch."""
    if members is None:
        members = {f"data_batch_{i}": _cifar_batch(per_batch, i) for i in range(1, 6)}
        members["test_batch"] = _cifar_batch(per_batch, 99)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _sum(path: Path) -> tuple[int, str]:
    blob = path.read_bytes()
    return len(blob), hashlib.md5(blob).hexdigest()


def _files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


# ------------------------------------------------------------------------------- MNIST / Fashion-MNIST


def test_mnist_shapes_dtypes_and_ranges(mnist: data.Dataset) -> None:
    assert mnist.name == "mnist" and mnist.split == "test" and mnist.num_classes == 10
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.input_shape == (1, 28, 28) and mnist.input_dim == 784
    for x in (mnist.x_train, mnist.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Mean pixel of the official training set: 33.3184 / 255.
    assert float(mnist.x_train.mean()) == pytest.approx(0.1307, abs=1e-4)
    assert torch.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS


def test_fashion_mnist_shapes_and_labels() -> None:
    ds = load_dataset("fashion-mnist", _need("fashion-mnist"), download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_test.dtype == torch.int64
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    assert float(ds.x_train.mean()) == pytest.approx(0.2860, abs=1e-4)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


def test_validation_split_is_last_tenth_of_train(mnist: data.Dataset, mnist_val: data.Dataset) -> None:
    assert mnist_val.split == "validation"
    assert len(mnist_val.x_train) == len(mnist_val.y_train) == 54000
    assert len(mnist_val.x_test) == len(mnist_val.y_test) == 6000
    assert torch.equal(mnist_val.x_train, mnist.x_train[:54000])
    assert torch.equal(mnist_val.x_test, mnist.x_train[54000:])
    assert torch.equal(mnist_val.y_test, mnist.y_train[54000:])


def test_mean_subtract_mnist_centres_train(mnist: data.Dataset) -> None:
    ds = load_dataset("mnist", SHARED, mean_subtract=True, download=False)
    assert abs(float(ds.x_train.mean())) < 1e-5
    mean = mnist.x_train.mean()
    torch.testing.assert_close(ds.x_test[:500], mnist.x_test[:500] - mean)


def test_second_load_does_not_rehash(monkeypatch: pytest.MonkeyPatch, mnist: data.Dataset) -> None:
    calls: list[Path] = []

    def counting_md5(path: Path) -> str:
        calls.append(path)
        return ""

    monkeypatch.setattr(data, "_md5", counting_md5)
    load_dataset("mnist", SHARED, download=False)  # the module fixture already verified these files
    assert calls == []


# ------------------------------------------------------------------------------------------ digits


def test_digits_shapes_stratified_deterministic() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 1, 8, 8) and ds.x_test.shape == (450, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8) and ds.input_dim == 64 and ds.num_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # Stratified: every class has the same share in train and test as in the whole set (to rounding).
    tr = torch.bincount(ds.y_train, minlength=10).double()
    te = torch.bincount(ds.y_test, minlength=10).double()
    total = tr + te
    assert torch.all((tr - 0.75 * total).abs() <= 1.0) and torch.all((te - 0.25 * total).abs() <= 1.0)
    again = load_dataset("digits")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_digits_validation_split_and_dtype() -> None:
    full = load_dataset("digits")
    val = load_dataset("digits", split="validation", dtype=torch.float64)
    n_fit = (9 * 1347) // 10
    assert val.x_train.dtype == torch.float64
    assert len(val.x_train) == n_fit and len(val.x_test) == 1347 - n_fit
    torch.testing.assert_close(val.x_test, full.x_train[n_fit:].double())
    assert torch.equal(val.y_train, full.y_train[:n_fit])


def test_digits_mean_subtract_uses_train_mean() -> None:
    plain = load_dataset("digits", split="validation")
    ds = load_dataset("digits", split="validation", mean_subtract=True)
    mean = plain.x_train.mean()
    assert abs(float(ds.x_train.mean())) < 1e-6
    torch.testing.assert_close(ds.x_test, plain.x_test - mean)


def test_unknown_dataset_split_and_dtype() -> None:
    with pytest.raises(DataError, match="cifar10") as exc:
        load_dataset("imagenet")
    assert all(name in str(exc.value) for name in DATASETS)
    assert isinstance(exc.value, LiftkitError)
    with pytest.raises(DataError, match="validation"):
        load_dataset("digits", split="train")
    with pytest.raises(ValueError, match="floating"):
        load_dataset("digits", dtype=torch.int64)


# ------------------------------------------------------------------------------ verification errors


def test_corrupt_file_reports_md5(tmp_path: Path) -> None:
    bad = _link_official(tmp_path, "mnist", "train-labels-idx1-ubyte.gz")
    blob = bytearray((SHARED / "mnist" / bad.name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="md5") as exc:
        load_dataset("mnist", tmp_path, download=False)
    msg = str(exc.value)
    assert str(bad) in msg and "d53e105ee54ea40749a09fcbcd1e9432" in msg and "re-download" in msg
    assert "\n" not in msg
    status = {d["name"]: d for d in dataset_status(tmp_path)}["mnist"]
    assert status["ready"] is False
    by_file = {f["file"]: f["status"] for f in status["files"]}
    assert by_file[bad.name].startswith("corrupt: md5")
    assert by_file["train-images-idx3-ubyte.gz"] == "ok"


def test_truncated_file_reports_size(tmp_path: Path) -> None:
    bad = _link_official(tmp_path, "mnist", "t10k-labels-idx1-ubyte.gz")
    bad.write_bytes((SHARED / "mnist" / bad.name).read_bytes()[:1000])
    with pytest.raises(DataError, match="size") as exc:
        load_dataset("mnist", tmp_path, download=False)
    assert "1000" in str(exc.value) and "4542" in str(exc.value) and str(bad) in str(exc.value)


def test_missing_file_without_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file train-images-idx3-ubyte\.gz") as exc:
        load_dataset("fashion-mnist", tmp_path, download=False)
    msg = str(exc.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") in msg and "LIFTKIT_DATA_DIR" in msg
    assert _files_in(tmp_path) == []


def test_missing_file_download_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download failed") as exc:
        load_dataset("mnist", tmp_path, download=True)
    msg = str(exc.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "mnist") in msg
    assert "network disabled" in msg and "\n" not in msg
    assert _files_in(tmp_path / "mnist") == []  # no partial or temp file left behind


def test_download_interrupted_or_corrupt_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Dropped(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise TimeoutError("read timed out")
            return super().read(10)

    # First mirror: the connection drops mid-file; second mirror: serves a truncated file.
    responses = iter([Dropped(b"x" * 100), io.BytesIO(b"y" * 100)])
    monkeypatch.setattr(data, "_urlopen", lambda url, timeout: next(responses))
    with pytest.raises(DataError, match="download failed") as exc:
        load_dataset("mnist", tmp_path)
    assert "read timed out" in str(exc.value) and "size is 100 bytes" in str(exc.value)
    assert _files_in(tmp_path / "mnist") == []


def test_download_falls_back_to_next_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fname = "t10k-labels-idx1-ubyte.gz"
    blob = (_need("mnist") / "mnist" / fname).read_bytes()
    urls: list[str] = []

    def fake(url: str, timeout: float) -> io.BytesIO:
        urls.append(url)
        if len(urls) == 1:
            raise urllib.error.HTTPError(url, 403, "Forbidden", email.message.Message(), None)
        return io.BytesIO(blob)

    monkeypatch.setattr(data, "_urlopen", fake)
    path = data._require("mnist", fname, tmp_path, download=True)
    assert path == tmp_path / "mnist" / fname and path.read_bytes() == blob
    assert urls == [base + fname for base in data._MIRRORS["mnist"]]
    assert urls[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert _files_in(tmp_path / "mnist") == [fname]


def test_idx_decoding_on_small_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sums = _write_fake_idx_dataset(tmp_path, "mnist", n_train=20, n_test=10)
    monkeypatch.setitem(data._CHECKSUMS, "mnist", sums)
    ds = load_dataset("mnist", tmp_path, split="validation", download=False)
    assert ds.x_train.shape == (18, 1, 28, 28) and ds.x_test.shape == (2, 1, 28, 28)
    assert ds.y_test.tolist() == [8, 9]
    assert all(d["ready"] == (d["name"] in ("digits", "mnist")) for d in dataset_status(tmp_path))


def test_idx_format_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        data._read_idx(path, 2049)
    path.write_bytes(_idx_bytes(np.zeros(50), 2049))  # a label file where images are expected
    with pytest.raises(DataError, match="magic is 2049, expected 2051"):
        data._read_idx(path, 2051)
    path.write_bytes(gzip.compress(struct.pack(">II", 2049, 7) + bytes(5)))  # header says 7, has 5
    with pytest.raises(DataError, match="implies"):
        data._read_idx(path, 2049)
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(DataError, match="shorter"):
        data._read_idx(path, 2051)
    path.write_bytes(_idx_bytes(np.zeros(5), 2049)[:-4])  # truncated gzip stream
    with pytest.raises(DataError, match="gzip"):
        data._read_idx(path, 2049)


def test_verification_is_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    expected = (5, hashlib.md5(b"hello").hexdigest())
    real_md5 = data._md5
    calls: list[Path] = []

    def counting_md5(p: Path) -> str:
        calls.append(p)
        return real_md5(p)

    monkeypatch.setattr(data, "_md5", counting_md5)
    assert data._check_file(path, expected) is None
    assert data._check_file(path, expected) is None
    assert len(calls) == 1
    path.write_bytes(b"jello")  # same size, new content, new mtime: hashed again
    os.utime(path, ns=(1, 1))
    assert "md5" in (data._check_file(path, expected) or "")
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ CIFAR-10


def test_read_cifar10_tar(tmp_path: Path) -> None:
    path = tmp_path / "c.tar.gz"
    _write_cifar_tar(path, per_batch=2)
    x_train, y_train, x_test, y_test = data._read_cifar10_tar(path)
    assert x_train.shape == (10, 3, 32, 32) and x_test.shape == (2, 3, 32, 32)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64 and y_test.shape == (2,)
    first = pickle.loads(_cifar_batch(2, 1))
    # A row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 image.
    assert np.array_equal(x_train[0, 1, 0, :], first[b"data"][0, 1024 : 1024 + 32])
    assert y_train[:2].tolist() == first[b"labels"]


def test_load_cifar10_from_small_official_format_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    _write_cifar_tar(path, per_batch=2)
    # The real table rejects the small file on size, before reading it.
    with pytest.raises(DataError, match="170498071"):
        load_dataset("cifar10", tmp_path, download=False)
    monkeypatch.setitem(data._CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": _sum(path)})
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.input_dim == 3072 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    val = load_dataset("cifar10", tmp_path, split="validation", mean_subtract=True, download=False)
    assert val.x_train.shape[0] == 9 and val.x_test.shape[0] == 1
    assert val.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-6  # per channel
    assert {d["name"]: d["ready"] for d in dataset_status(tmp_path)}["cifar10"] is True


def test_cifar10_reader_rejects_bad_archives(tmp_path: Path) -> None:
    path = tmp_path / "c.tar.gz"
    _write_cifar_tar(path, members={"data_batch_1": _cifar_batch(2, 1)})
    with pytest.raises(DataError, match="no cifar-10-batches-py/data_batch_2"):
        data._read_cifar10_tar(path)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo pwned",))

    _write_cifar_tar(path, members={"data_batch_1": pickle.dumps({b"x": Evil()}, protocol=2)})
    with pytest.raises(DataError, match="unexpected object"):
        data._read_cifar10_tar(path)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"tar\.gz"):
        data._read_cifar10_tar(path)


def test_cifar_reader_accepts_protocol_5_pickles(tmp_path: Path) -> None:
    path = tmp_path / "c.tar.gz"
    members = {f"data_batch_{i}": _cifar_batch(1, i, protocol=5) for i in range(1, 6)}
    members["test_batch"] = _cifar_batch(1, 0, protocol=5)
    _write_cifar_tar(path, members=members)
    assert data._read_cifar10_tar(path)[0].shape == (5, 3, 32, 32)


# ---------------------------------------------------------------------------------------- status


def test_dataset_status_empty_dir(tmp_path: Path) -> None:
    report = dataset_status(tmp_path)
    assert [d["name"] for d in report] == list(DATASETS)
    by_name = {d["name"]: d for d in report}
    assert by_name["digits"] == {"name": "digits", "files": [], "ready": True}
    for name in ("mnist", "fashion-mnist", "cifar10"):
        assert by_name[name]["ready"] is False
        assert all(f["status"] == "missing" for f in by_name[name]["files"])
        assert all(f["path"] == str(tmp_path / name / f["file"]) for f in by_name[name]["files"])
    assert len(by_name["mnist"]["files"]) == 4 and len(by_name["cifar10"]["files"]) == 1


def test_dataset_status_shared_dir() -> None:
    _need("mnist")
    _need("fashion-mnist")
    ready = {d["name"]: d["ready"] for d in dataset_status(SHARED)}
    assert ready["mnist"] and ready["fashion-mnist"] and ready["digits"]


# ------------------------------------------------------------------------------------------ data dir


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("LIFTKIT_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "liftkit" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "liftkit" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "liftkit" / "data"
    monkeypatch.setenv("LIFTKIT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert not (tmp_path / "env").exists()  # resolving never creates anything


# ------------------------------------------------------------------------------------------ batching


def test_batch_indices_deterministic_and_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    a = batch_indices(50, 8, seed=3, epoch=2)
    torch.manual_seed(2)
    torch.rand(10)
    b = batch_indices(50, 8, seed=3, epoch=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = torch.cat(batch_indices(50, 8, seed=3, epoch=3))
    other_seed = torch.cat(batch_indices(50, 8, seed=4, epoch=2))
    swapped = torch.cat(batch_indices(50, 8, seed=2, epoch=3))
    for c in (other_epoch, other_seed, swapped):
        assert not torch.equal(torch.cat(a), c)


@pytest.mark.parametrize(
    ("n", "bs", "sizes"), [(100, 32, [32, 32, 32, 4]), (64, 16, [16] * 4), (10, 10, [10])]
)
def test_batch_indices_shuffle_covers_each_index_once(n: int, bs: int, sizes: list[int]) -> None:
    batches = batch_indices(n, bs, seed=0, epoch=0)
    assert [len(b) for b in batches] == sizes
    assert all(b.dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))


def test_batch_indices_full_batch_and_in_order() -> None:
    (full,) = batch_indices(7, 1000, seed=0, epoch=0)
    assert sorted(full.tolist()) == list(range(7))
    ordered = batch_indices(10, 4, seed=0, epoch=5, shuffle=False)
    assert [b.tolist() for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batch_indices(0, 4, seed=0, epoch=0) == []


def test_batch_indices_with_replacement() -> None:
    batches = batch_indices(100, 32, seed=1, epoch=0, sampling="replacement")
    assert len(batches) == math.ceil(100 / 32) and all(len(b) == 32 for b in batches)
    flat = torch.cat(batches)
    assert int(flat.min()) >= 0 and int(flat.max()) < 100
    assert len(set(flat.tolist())) < len(flat)  # 128 draws from 100: repeats are certain
    again = batch_indices(100, 32, seed=1, epoch=0, sampling="replacement")
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    (full,) = batch_indices(5, 50, seed=0, epoch=0, sampling="replacement")
    assert len(full) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"sampling": "bogus"}, "sampling"),
    ],
)
def test_batch_indices_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"batch_size": 4, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        batch_indices(10, **args)


# ------------------------------------------------------------------------------------ checks


def test_one_hot() -> None:
    y = torch.tensor([2, 0, 1])
    out = one_hot(y, 3)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    assert one_hot(y, 4, dtype=torch.float64).shape == (3, 4)
    with pytest.raises(ValueError, match="labels must lie in"):
        one_hot(torch.tensor([3]), 3)


def test_check_inputs_accepts_good_batches() -> None:
    x = torch.rand(4, 1, 2, 2)
    check_inputs(x, torch.tensor([0, 1, 2, 1]), num_classes=3)
    check_inputs(x, None)
    check_inputs(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32))


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.zeros(3, 2, dtype=torch.int64), None, "floating"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), None, "1 NaN"),
        (torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), None, "1 inf"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), "3 samples but labels have 2"),
        (torch.zeros(2, 2), torch.tensor([0, 10]), r"\[0, 10\)"),
        (torch.zeros(2, 2), torch.tensor([-1, 0]), r"-1"),
        (torch.zeros(2, 2), torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(2, 2), torch.tensor([[0], [1]]), "1-D"),
    ],
)
def test_check_inputs_errors(x: torch.Tensor, y: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match) as exc:
        check_inputs(x, y, num_classes=10)
    assert "\n" not in str(exc.value)


def test_dataset_repr_is_short() -> None:
    ds = data.Dataset(
        "t",
        torch.zeros(2, 1, 3, 3),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(1, 1, 3, 3),
        torch.zeros(1, dtype=torch.int64),
        num_classes=2,
        split="test",
    )
    assert repr(ds) == "Dataset(name='t', num_classes=2, split='test')"
    assert ds.input_shape == (1, 3, 3) and ds.input_dim == 9
