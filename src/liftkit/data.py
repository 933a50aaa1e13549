"""Datasets, mini-batching and input checks.

Datasets are read from the official files, byte for byte as their publishers distribute them, in a data
directory (see :func:`resolve_data_dir`)::

    <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/fashion-mnist/   (same four names)
    <data_dir>/cifar10/cifar-10-python.tar.gz

Every file's size and MD5 are checked against the published values before it is decoded, so a truncated
download or a file from some other source is reported as such instead of silently changing results. A
missing file is downloaded from the official location when ``download=True`` and a network is reachable.
``digits`` (the 8x8 UCI digits) is bundled with scikit-learn and needs no files.

No torchvision: IDX files are decoded with ``gzip`` + ``numpy.frombuffer`` and the CIFAR-10 archive with
``tarfile`` + a restricted unpickler.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from liftkit.errors import DataError

__all__ = [
    "DATASETS",
    "Dataset",
    "batch_indices",
    "check_inputs",
    "dataset_status",
    "load_dataset",
    "one_hot",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")

SPLITS: tuple[str, ...] = ("test", "validation")

_IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR_FILE = "cifar-10-python.tar.gz"

# Files each dataset needs, relative to <data_dir>/<dataset>/. Kept apart from _CHECKSUMS so that tests can
# change a checksum without changing which files are looked for.
_FILES: dict[str, tuple[str, ...]] = {
    "digits": (),
    "mnist": _IDX_FILES,
    "fashion-mnist": _IDX_FILES,
    "cifar10": (_CIFAR_FILE,),
}

# Published (size in bytes, MD5) of every official file. MNIST: the values torchvision and the MNIST mirrors
# list; Fashion-MNIST: Zalando Research's README; CIFAR-10: Alex Krizhevsky's page. An entry set to None
# skips verification (only tests do that, to read small files they write in the official format).
_CHECKSUMS: dict[str, dict[str, tuple[int, str] | None]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (26421880, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte.gz": (29515, "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte.gz": (4422102, "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte.gz": (5148, "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    "cifar10": {
        _CIFAR_FILE: (170498071, "c58f30108f718f92721af3b95e74349a"),
    },
}

# Official download locations, tried in order; a file's URL is the base joined with its name. MNIST's own
# page (yann.lecun.com) has been unreliable for years, hence the S3 mirror torchvision uses comes first.
_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

_NUM_CLASSES: dict[str, int] = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10}

# Seconds a blocking network operation (connect, or one read) may take before a mirror is given up on.
_DOWNLOAD_TIMEOUT = 10.0

# The pixel maximum of each dataset's raw values, to scale pixels to [0, 1]. The 8x8 digits count 0..16.
_PIXEL_MAX: dict[str, float] = {"digits": 16.0, "mnist": 255.0, "fashion-mnist": 255.0, "cifar10": 255.0}

# Results of successful verifications, so that a second load in the same process does not hash ~200 MB
# again. Keyed on what changes when the file is replaced or rewritten (and on the expected MD5, so changing
# _CHECKSUMS invalidates it). Only successes are stored: a failure is always re-checked.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()

_FIX = "delete it and re-download, or copy the official file there"


@dataclass
class Dataset:
    """A dataset split into training and evaluation tensors.

    ``x_*`` are floating tensors of shape (N, C, H, W) with pixels in [0, 1] (minus the training mean when
    loaded with ``mean_subtract=True``); ``y_*`` are int64 labels in [0, num_classes). ``split`` says what
    ``x_test``/``y_test`` hold: ``"test"`` the official test set, ``"validation"`` the last 10% of the
    official training set (which is then not in ``x_train``).
    """

    name: str
    # repr=False: the default dataclass repr would print four large tensors.
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    split: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, (C, H, W)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """Number of input features, C*H*W (the width of a flattened input)."""
        return math.prod(self.input_shape)


# --------------------------------------------------------------------------------------------- data dir


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$LIFTKIT_DATA_DIR``, else a user cache dir.

    The cache dir is ``$XDG_CACHE_HOME/liftkit/data`` when ``XDG_CACHE_HOME`` is set to an absolute path
    (the XDG spec says to ignore relative ones), else ``~/.cache/liftkit/data``. The directory is not
    created here; a download creates it when it needs to.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("LIFTKIT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "liftkit" / "data"


# ----------------------------------------------------------------------------------------- verification


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, expected: tuple[int, str] | None) -> str | None:
    """Return None if ``path`` matches ``expected`` (size, MD5), else a short reason why not.

    The size is compared first: it is free and catches the usual failure (a truncated download) with a
    clearer message than an MD5 mismatch.
    """
    st = path.stat()
    if expected is None:
        return None
    size, md5 = expected
    if st.st_size != size:
        return f"size is {st.st_size} bytes, expected {size}"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, md5)
    if key in _VERIFIED:
        return None
    actual = _md5(path)
    if actual != md5:
        return f"md5 is {actual}, expected {md5}"
    _VERIFIED.add(key)
    return None


def _file_status(path: Path, expected: tuple[int, str] | None) -> str:
    """``"ok"``, ``"missing"`` or ``"corrupt: <why>"`` for one dataset file (for ``liftkit datasets``)."""
    if not path.is_file():
        return "missing"
    try:
        why = _check_file(path, expected)
    except OSError as e:
        return f"corrupt: cannot read it ({e.strerror or e})"
    return "ok" if why is None else f"corrupt: {why}"


def dataset_status(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Report, for each dataset in :data:`DATASETS`, whether its files are present and verified.

    Returns one dict per dataset: ``{"name", "files": [{"file", "path", "status"}], "ready"}`` where
    ``status`` is ``"ok"``, ``"missing"`` or ``"corrupt: <why>"`` and ``ready`` is True when every file is
    ``"ok"``. ``digits`` has no files (it ships with scikit-learn) and is always ready.
    """
    root = resolve_data_dir(data_dir)
    report: list[dict[str, Any]] = []
    for name in DATASETS:
        files = []
        for fname in _FILES[name]:
            path = root / name / fname
            files.append(
                {"file": fname, "path": str(path), "status": _file_status(path, _expected(name, fname))}
            )
        report.append({"name": name, "files": files, "ready": all(f["status"] == "ok" for f in files)})
    return report


def _expected(name: str, fname: str) -> tuple[int, str] | None:
    return _CHECKSUMS.get(name, {}).get(fname)


# -------------------------------------------------------------------------------------------- download


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    """Open ``url`` for reading. A seam: tests replace it to simulate a network (or the lack of one)."""
    req = urllib.request.Request(url, headers={"User-Agent": "liftkit"})
    resp: IO[bytes] = urllib.request.urlopen(req, timeout=timeout)
    return resp


def _download(name: str, fname: str, dest: Path) -> None:
    """Download ``fname`` of dataset ``name`` to ``dest``, trying each mirror; raise OSError if all fail.

    Each attempt writes to a temp file in ``dest``'s directory, verifies it, fsyncs it and only then renames
    it over ``dest`` (os.replace is atomic within a directory), so ``dest`` is either absent or complete and
    verified, also if the process is killed mid-download or two processes download at once.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for base in _MIRRORS[name]:
        url = base + fname
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s to %s", url, dest)
            with os.fdopen(fd, "wb") as out:
                with _urlopen(url, _DOWNLOAD_TIMEOUT) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            why = _check_file(tmp, _expected(name, fname))
            if why is not None:
                errors.append(f"{url}: downloaded file {why}")
                continue
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
            return
        except OSError as e:  # URLError, HTTPError, socket timeouts and disk errors are all OSErrors
            errors.append(f"{url}: {_reason(e)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError("; ".join(errors) if errors else "no download location known")


def _reason(e: BaseException) -> str:
    """A one-line reason for a failed download (URLError wraps the interesting error in ``.reason``)."""
    reason = getattr(e, "reason", None)
    text = str(reason) if reason is not None else (str(e) or type(e).__name__)
    return " ".join(text.split())


def _fsync_dir(path: Path) -> None:
    """Persist a rename. Best effort: not every platform or file system lets a directory be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _require(name: str, fname: str, root: Path, download: bool) -> Path:
    """Return the verified path of one dataset file, downloading it first if it is missing and allowed."""
    path = root / name / fname
    if not path.is_file():
        hint = f"put the official file at {path} or set --data-dir/LIFTKIT_DATA_DIR"
        if not download:
            raise DataError(f"missing file {fname} for dataset {name}; {hint} (download disabled)")
        try:
            _download(name, fname, path)
        except OSError as e:
            raise DataError(f"missing file {fname} for dataset {name}; {hint} (download failed: {e})") from e
    try:
        why = _check_file(path, _expected(name, fname))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
    if why is not None:
        raise DataError(f"corrupt file {path} for dataset {name}: {why}; {_FIX}")
    return path


# -------------------------------------------------------------------------------------------- decoding


def _gunzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return gzip.decompress(f.read())
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # bad header, truncated stream, bad CRC
        raise DataError(f"corrupt file {path}: not a valid gzip file ({e}); {_FIX}") from e


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode a gzipped IDX file of unsigned bytes: images (magic 2051, ndim 3) or labels (2049, ndim 1).

    The header is a big-endian uint32 magic (0x0000, type 0x08 = ubyte, ndim) followed by ndim uint32 sizes;
    the data length must match the sizes exactly, so that a wrong or damaged file fails here and not later
    as a mysteriously shaped tensor.
    """
    raw = _gunzip(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt file {path}: {len(raw)} bytes is shorter than an IDX header; {_FIX}")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise DataError(f"corrupt file {path}: IDX magic is {got}, expected {magic}; {_FIX}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected_len = header + math.prod(dims)
    if len(raw) != expected_len:
        raise DataError(
            f"corrupt file {path}: {len(raw)} bytes after gunzip, the IDX header {dims} implies "
            f"{expected_len}; {_FIX}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_pair(root: Path, name: str, prefix: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    img_path = _require(name, f"{prefix}-images-idx3-ubyte.gz", root, download)
    lbl_path = _require(name, f"{prefix}-labels-idx1-ubyte.gz", root, download)
    images = _read_idx(img_path, 2051)
    labels = _read_idx(lbl_path, 2049)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"dataset {name}: {img_path.name} has {images.shape[0]} images but {lbl_path.name} has "
            f"{labels.shape[0]} labels; {_FIX}"
        )
    return images[:, None, :, :], labels


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can build only what the official CIFAR-10 batches contain: dicts, lists, bytes, ints
    and numpy uint8 arrays.

    The files are MD5-verified before they are read, but pickle can run arbitrary code, so refusing every
    other global keeps a tampered file (or a test file whose checksum was skipped) from doing so.
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _PICKLE_ALLOWED.get((module.replace("numpy._core", "numpy.core"), name))
        if obj is None:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return obj


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    # numpy 2 moved numpy.core to numpy._core; pickles name either. Take the reconstruction functions from
    # numpy's own reduce output so that they are whatever this numpy version actually uses.
    reconstruct = np.zeros(1, dtype=np.uint8).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes under pickle protocol 2 as _codecs.encode(str, "latin1"); harmless, and
        # needed to read batches re-pickled by Python 3 (the official Python 2 files store plain strings).
        ("_codecs", "encode"): codecs.encode,
    }
    frombuffer = np.zeros(1, dtype=np.uint8).__reduce_ex__(5)[0]
    if getattr(frombuffer, "__name__", "") == "_frombuffer":  # protocol-5 pickles (not the official ones)
        allowed[("numpy.core.numeric", "_frombuffer")] = frombuffer
    return allowed


_PICKLE_ALLOWED = _numpy_pickle_globals()


def _unpickle_batch(tar: tarfile.TarFile, member: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise DataError(f"corrupt file {path}: the archive has no {member}; {_FIX}")
    try:
        batch = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise DataError(f"corrupt file {path}: cannot read {member} ({e}); {_FIX}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"corrupt file {path}: {member} data is {data.dtype} {data.shape}, expected uint8 (n, 3072); "
            f"{_FIX}"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(
            f"corrupt file {path}: {member} labels do not match its images or lie outside 0..9; {_FIX}"
        )
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32: i.e. (3, 32, 32).
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar10_tar(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 from the official ``cifar-10-python.tar.gz``: ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 (N, 3, 32, 32), labels int64 (N,). The archive holds pickled dicts
    ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` (training) and ``test_batch``, each with
    ``b"data"`` (uint8, (n, 3072)) and ``b"labels"`` (list of n ints). Does not verify the checksum: callers
    do, via :func:`_require`.
    """
    path = Path(path)
    prefix = "cifar-10-batches-py/"
    try:
        with tarfile.open(path, "r:gz") as tar:
            train = [_unpickle_batch(tar, f"{prefix}data_batch_{i}", path) for i in range(1, 6)]
            x_test, y_test = _unpickle_batch(tar, f"{prefix}test_batch", path)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"corrupt file {path}: cannot read it as a tar.gz archive ({e}); {_FIX}") from e
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The UCI 8x8 digits from scikit-learn, in a fixed stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits  # imported lazily: scikit-learn is slow to import
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    shape = (-1, 1, 8, 8)
    return x_train.reshape(shape), y_train, x_test.reshape(shape), y_test


# ------------------------------------------------------------------------------------------- load_dataset


def _to_tensor(a: np.ndarray, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    # np.frombuffer arrays are read-only and torch.from_numpy warns on those, so convert with a copy;
    # the conversion to float copies anyway.
    t = torch.from_numpy(np.array(a, copy=True))
    if scale is None:
        return t.to(torch.int64)
    return t.to(dtype).div_(scale)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    mean_subtract: bool = False,
    dtype: torch.dtype = torch.float32,
    download: bool = True,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as float tensors with pixels in [0, 1].

    Args:
        name: ``"digits"``, ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"``.
        data_dir: where the dataset files are; see :func:`resolve_data_dir`. Unused for ``digits``.
        split: ``"test"``: train on the whole official training set, evaluate on the official test set.
            ``"validation"``: train on the first 90% of the official training set and evaluate on its last
            10%, for tuning hyperparameters without looking at the test set.
        mean_subtract: subtract the per-channel mean of the returned training images from train and test.
        dtype: floating dtype of the images.
        download: fetch missing files from their official locations (verified before use).

    Raises:
        DataError: unknown name or split, or a file missing (and not downloadable), corrupt or malformed.
        ValueError: ``dtype`` is not a floating dtype.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")

    root = resolve_data_dir(data_dir)
    if name == "digits":
        xtr, ytr, xte, yte = _load_digits()
    elif name == "cifar10":
        xtr, ytr, xte, yte = _read_cifar10_tar(_require(name, _CIFAR_FILE, root, download))
    else:
        xtr, ytr = _load_idx_pair(root, name, "train", download)
        xte, yte = _load_idx_pair(root, name, "t10k", download)

    if split == "validation":
        # A fixed, unshuffled cut: the official training sets are not ordered by class, and a split that
        # does not depend on any seed keeps validation results comparable across runs.
        n_fit = (9 * len(ytr)) // 10
        xtr, ytr, xte, yte = xtr[:n_fit], ytr[:n_fit], xtr[n_fit:], ytr[n_fit:]

    scale = _PIXEL_MAX[name]
    x_train, x_test = _to_tensor(xtr, dtype, scale), _to_tensor(xte, dtype, scale)
    y_train, y_test = _to_tensor(ytr, dtype), _to_tensor(yte, dtype)
    if mean_subtract:
        # torch sums floating tensors with cascade (pairwise) summation, so a float32 mean over ~47M MNIST
        # pixels is within ~1e-8 of the float64 one; asking for dtype=float64 would cost ~1 s for a copy.
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        x_train.sub_(mean)
        x_test.sub_(mean)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=_NUM_CLASSES[name],
        split=split,
    )


# ------------------------------------------------------------------------------------------- batching


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch) only, so a batch order never depends on global RNG state.

    SeedSequence mixes the pair into a well-spread 63-bit seed: naive combinations such as seed + epoch
    give run (seed=1, epoch=0) the same order as (seed=0, epoch=1).
    """
    state = np.random.SeedSequence([seed % 2**64, epoch % 2**64]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state) >> 1)
    return g


def batch_indices(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    sampling: str = "shuffle",
) -> list[torch.Tensor]:
    """Split indices ``0..n-1`` into mini-batches for one epoch; returns a list of int64 index tensors.

    ``sampling="shuffle"``: a random permutation cut into batches of ``batch_size``; the last batch is smaller
    when ``batch_size`` does not divide ``n``, so every sample is used exactly once. ``"replacement"``:
    ``ceil(n / batch_size)`` batches of ``min(batch_size, n)`` indices, each drawn uniformly with
    replacement. ``shuffle=False`` gives ``0..n-1`` in order (for evaluation), whatever ``sampling`` is.
    ``batch_size >= n`` gives a single full batch. The result depends on ``(seed, epoch)`` only.

    Raises:
        ValueError: ``batch_size <= 0``, ``n < 0`` or an unknown ``sampling``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if sampling not in ("shuffle", "replacement"):
        raise ValueError(f"sampling must be 'shuffle' or 'replacement', got {sampling!r}")
    if n == 0:
        return []
    bs = min(batch_size, n)
    if not shuffle:
        return list(torch.arange(n, dtype=torch.int64).split(bs))
    g = _generator(seed, epoch)
    if sampling == "replacement":
        return [torch.randint(n, (bs,), generator=g, dtype=torch.int64) for _ in range(math.ceil(n / bs))]
    return list(torch.randperm(n, generator=g, dtype=torch.int64).split(bs))


# ---------------------------------------------------------------------------------------- checks


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Encode int labels ``y`` (N,) as an (N, num_classes) ``dtype`` matrix with one 1 per row.

    Raises:
        ValueError: ``y`` is not a 1-D integer tensor or has labels outside [0, num_classes).
    """
    _check_labels(y, num_classes)
    out = torch.zeros(y.shape[0], num_classes, dtype=dtype, device=y.device)
    return out.scatter_(1, y.long().unsqueeze(1), 1)


def _check_labels(y: torch.Tensor, num_classes: int | None) -> None:
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor (torch.int64), got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}")
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"labels must lie in {bound}, got values from {lo} to {hi}")


def check_inputs(x: torch.Tensor, y: torch.Tensor | None, num_classes: int | None = None) -> None:
    """Validate a batch of inputs (and labels) before training on it.

    Raises a ``ValueError`` with one line naming the problem if ``x`` is not floating point, contains NaN or
    inf, or has no batch dimension; or if ``y`` is not a 1-D integer tensor, its length differs from
    ``x``'s first dimension, or it has labels outside [0, num_classes) (or negative ones when
    ``num_classes`` is None).
    """
    if not x.dtype.is_floating_point:
        raise ValueError(f"inputs must be a floating tensor (e.g. torch.float32), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"inputs contain {n_nan} NaN and {n_inf} inf values; clean or rescale the data")
    if y is None:
        return
    _check_labels(y, num_classes)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"inputs have {x.shape[0]} samples but labels have {y.shape[0]}")
