"""Data sets for gaptrack's scenarios: built-in names, or a user's ``.npz``/``.csv``.

``load_dataset(name)`` returns a :class:`Dataset` of numpy arrays ready for
``model.fit``: ``x`` float32, ``y`` int64 class indices (not one-hot), split into
train and test. Everything loads offline:

- ``digits``, the embedded default: scikit-learn's 1,797 8x8 images of handwritten
  digits, shipped inside scikit-learn. Pixels 0..16 are divided by 16.
- ``fashion_mnist``: 60,000 + 10,000 28x28 grey images of clothes, 10 classes.
  Read from Debian's package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), else from Keras' cache
  (``$KERAS_HOME/datasets/fashion-mnist``, by default ``~/.keras/...``), else
  downloaded by Keras. The files are in the original IDX format, parsed and
  checked here.
- ``cifar10``: 50,000 + 10,000 32x32 colour images, 10 classes, channels last.
  Read from an extracted ``cifar-10-batches-py`` directory in Keras' cache, else
  downloaded by Keras.
- the path of a ``.npz`` (arrays ``x_train``, ``y_train`` and optionally
  ``x_test``, ``y_test``; or ``x``, ``y``) or of a ``.csv`` (a header row, one
  label column named ``label`` or ``y``, every other column a number).

8-bit images (the built-in sets, ``uint8`` arrays in a ``.npz``) are divided by
255 into [0, 1], as the Keras examples do; other data is kept as given. A set that
comes without a test split (digits, a ``.csv``, a ``.npz`` without ``x_test``) is
split 80/20, stratified by label, with ``seed``.

Keras, and so TensorFlow, is imported only to download. Keras' downloader has no
timeout, so the download host is first asked to answer within a few seconds: an
offline machine gets a :class:`DatasetError` saying where to put the files, not a
hang.
"""

import gzip
import http.client
import math
import os
import pickle
import struct
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["DATASETS", "Dataset", "DatasetError", "load_dataset"]

DATASETS = ("digits", "fashion_mnist", "cifar10")

_TEST_FRACTION = 0.2
_DOWNLOAD_TIMEOUT_S = 10.0
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_SPLITS = ("train", "t10k")
_FASHION_MNIST_FILES = tuple(
    f"{split}-{kind}-ubyte.gz"
    for split in _FASHION_MNIST_SPLITS for kind in ("images-idx3", "labels-idx1"))
# The URLs Keras downloads from (keras.datasets.*.load_data).
_FASHION_MNIST_URL = ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
                      "t10k-labels-idx1-ubyte.gz")
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_NPZ_KEYS = ({"x_train", "y_train"}, {"x_train", "y_train", "x_test", "y_test"},
             {"x", "y"})


class DatasetError(ValueError):
    """A data set cannot be found or read, or its content breaks the data contract."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into train and test, as numpy arrays.

    Attributes:
        name: the name or path it was loaded by.
        x_train, x_test: float32 samples, shape ``(n, *input_shape)``.
        y_train, y_test: int64 class indices in ``0 .. num_classes - 1``, shape ``(n,)``.
        num_classes: 10 for the built-in sets; the largest label + 1 for a user's file.
        input_shape: the shape of one sample, e.g. ``(8, 8)`` for digits.
        source: where the data came from: a file or directory, or ``scikit-learn``.
    """

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    input_shape: tuple
    source: str


def load_dataset(name, *, seed=0):
    """Loads a built-in data set or a user's ``.npz``/``.csv`` file.

    Args:
        name: one of ``DATASETS`` (``"digits"``, ``"fashion_mnist"``,
            ``"cifar10"``), or the path of a ``.npz`` or ``.csv`` file.
        seed: random state of the stratified 80/20 train/test split of a set that
            comes without a test split (digits, ``.csv``, ``.npz`` without
            ``x_test``); the same seed gives the same split. Sets that come split
            (fashion_mnist, cifar10, a ``.npz`` with ``x_test``) ignore it.

    Returns:
        A frozen :class:`Dataset`.

    Raises:
        DatasetError: the name is unknown, the file is missing or unreadable, or
            its content breaks the contract (wrong keys or columns, x and y of
            different lengths, labels that are not integers >= 0, no samples,
            NaN or infinite values in x), or a built-in set is neither on disk
            nor downloadable. The message names the bad value.

    Example:
        >>> ds = load_dataset("digits", seed=0)
        >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
        ((1437, 8, 8), (360, 8, 8), 10)
        >>> float(ds.x_train.max()), ds.y_train.dtype
        (1.0, dtype('int64'))
    """
    name = os.fspath(name)
    if name == "digits":
        return _digits(seed)
    if name == "fashion_mnist":
        return _fashion_mnist()
    if name == "cifar10":
        return _cifar10()
    suffix = Path(name).suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DatasetError(f"unknown data set {name!r}: expected one of "
                           f"{', '.join(DATASETS)}, or the path of a .npz or .csv file")
    path = Path(name).absolute()
    if not path.exists():
        raise DatasetError(f"data file {str(path)!r} not found")
    return _npz(name, path, seed) if suffix == ".npz" else _csv(name, path, seed)


def _digits(seed):
    digits = load_digits()
    source = "scikit-learn (sklearn.datasets.load_digits)"
    x, y = _checked(source, digits.images / 16.0, digits.target, "images", "target")
    return _dataset("digits", source, *_split(source, x, y, seed), num_classes=10)


def _fashion_mnist():
    cache = _keras_datasets_dir() / "fashion-mnist"
    for directory in (_DEBIAN_FASHION_MNIST, cache):
        if all((directory / f).is_file() for f in _FASHION_MNIST_FILES):
            source = str(directory)
            train, test = (_read_fashion_mnist(directory, s) for s in _FASHION_MNIST_SPLITS)
            break
    else:
        _require_download(
            _FASHION_MNIST_URL,
            f"fashion_mnist: no Fashion-MNIST files in {_DEBIAN_FASHION_MNIST} or {cache}",
            f"install Debian's package dataset-fashion-mnist, or place "
            f"{', '.join(_FASHION_MNIST_FILES)} in {cache}")
        import keras

        train, test = keras.datasets.fashion_mnist.load_data()
        source = "keras.datasets.fashion_mnist (downloaded)"
    train = _checked(source, *train, "train images", "train labels")
    test = _checked(source, *test, "test images", "test labels")
    return _dataset("fashion_mnist", source, *train, *test, num_classes=10)


def _read_fashion_mnist(directory, split):
    images = _read_idx(directory / f"{split}-images-idx3-ubyte.gz", ndim=3)
    labels = _read_idx(directory / f"{split}-labels-idx1-ubyte.gz", ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{directory / f'{split}-images-idx3-ubyte.gz'}: images are "
                           f"{images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are 28x28")
    return images, labels


def _read_idx(path, ndim):
    """Reads a gzip'd IDX file of unsigned bytes (LeCun's MNIST format).

    Layout: a big-endian 4-byte magic ``00 00 08 <ndim>`` (08: unsigned byte
    data), then ``ndim`` big-endian uint32 sizes, then the data, row-major, one
    byte per value. Labels are ``ndim=1``, images ``ndim=3`` (n, rows, cols).
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable gzip file ({_one_line(e)})") from None
    magic = bytes((0, 0, 0x08, ndim))
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != magic:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes with {ndim} "
                           f"dimension(s): magic {raw[:4].hex()}, expected {magic.hex()}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DatasetError(f"{path}: header announces shape {dims} ({math.prod(dims)} bytes) "
                           f"but the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _cifar10():
    root = _keras_datasets_dir()
    # Where the original tarball extracts to, and where Keras 3 extracts it.
    candidates = (root / "cifar-10-batches-py",
                  root / "cifar-10-batches-py-target" / "cifar-10-batches-py")
    for directory in candidates:
        if all((directory / f).is_file() for f in _CIFAR10_BATCHES):
            source = str(directory)
            batches = [_read_cifar10_batch(directory / f) for f in _CIFAR10_BATCHES]
            train = (np.concatenate([x for x, _ in batches[:-1]]),
                     np.concatenate([y for _, y in batches[:-1]]))
            test = batches[-1]
            break
    else:
        _require_download(
            _CIFAR10_URL,
            f"cifar10: no cifar-10-batches-py directory in {root}",
            f"to work offline, extract cifar-10-python.tar.gz into {root} "
            f"($KERAS_HOME/datasets) so that {candidates[0] / 'data_batch_1'} exists, "
            f"or pass the path of a .npz with x_train, y_train, x_test, y_test")
        import keras

        train, test = keras.datasets.cifar10.load_data()
        if keras.config.image_data_format() == "channels_first":
            train, test = ((x.transpose(0, 2, 3, 1), y) for x, y in (train, test))
        source = "keras.datasets.cifar10 (downloaded)"
    train = _checked(source, *train, "train images", "train labels")
    test = _checked(source, *test, "test images", "test labels")
    return _dataset("cifar10", source, *train, *test, num_classes=10)


def _read_cifar10_batch(path):
    """Reads one batch of CIFAR-10's python version: a pickled dict whose
    ``b"data"`` is uint8 (n, 3072), each row the red, green then blue 32x32
    planes, and ``b"labels"`` a list of n ints. Returns channels-last images.

    Unpickling can run code: like Keras, read only a directory you trust.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"])
    # What pickle.load raises on a bad file (see its docs), then the dict's lookups.
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError,
            IndexError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch, a pickled dict with "
                           f"b'data' and b'labels' ({_one_line(e)})") from None
    return images.transpose(0, 2, 3, 1), labels


def _keras_datasets_dir():
    """Keras' download cache: ``$KERAS_HOME/datasets``, by default ``~/.keras/datasets``."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "datasets"


def _require_download(url, missing, how_to):
    """Raises DatasetError, fast, unless ``url`` answers within the timeout.

    Keras downloads with ``urlretrieve``, which has no timeout: where a firewall
    drops packets it would hang instead of failing.
    """
    try:
        urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S).close()
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(f"{missing}, and {url} cannot be reached "
                           f"({_one_line(reason)}); {how_to}") from None


def _npz(name, path, seed):
    source = str(path)
    if not zipfile.is_zipfile(path):  # np.load would also read a lone .npy or a pickle
        raise DatasetError(f"{source}: not an .npz archive (the zip of .npy arrays that "
                           f"numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{source}: cannot read as an .npz archive ({_one_line(e)})") from None
    if set(arrays) not in _NPZ_KEYS:
        raise DatasetError(f"{source}: holds arrays {sorted(arrays)}; expected x_train, "
                           f"y_train (and optionally x_test, y_test), or x, y")
    x_key, y_key = ("x", "y") if "x" in arrays else ("x_train", "y_train")
    x, y = _checked(source, arrays[x_key], arrays[y_key], x_key, y_key)
    if "x_test" not in arrays:
        return _dataset(name, source, *_split(source, x, y, seed))
    x_test, y_test = _checked(source, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
    return _dataset(name, source, x, y, x_test, y_test)


def _csv(name, path, seed):
    source = str(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as e:  # pandas' ParserError, EmptyDataError are ValueErrors
        raise DatasetError(f"{source}: cannot read as CSV with a header row "
                           f"({_one_line(e)})") from None
    label = [c for c in ("label", "y") if c in frame.columns]
    if len(label) != 1:
        raise DatasetError(f"{source}: needs one label column, named 'label' or 'y'; "
                           f"found columns {list(frame.columns)}")
    features = frame.drop(columns=label)
    if len(frame) == 0 or features.shape[1] == 0:
        raise DatasetError(f"{source}: needs at least one row and one feature column; found "
                           f"{len(frame)} rows, feature columns {list(features.columns)}")
    text = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if text:
        raise DatasetError(f"{source}: feature columns must hold numbers; {text} do not")
    x, y = _checked(source, features.to_numpy(np.float32), frame[label[0]].to_numpy(),
                    "features", f"column {label[0]!r}")
    return _dataset(name, source, *_split(source, x, y, seed))


def _checked(source, x, y, x_key, y_key):
    """Returns ``x`` as float32 (uint8 divided by 255) and ``y`` as int64 class
    indices, or raises DatasetError naming what breaks the contract."""
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras' cifar10 labels are (n, 1)
        y = y[:, 0]
    if x.ndim < 2 or y.ndim != 1:
        raise DatasetError(f"{source}: {x_key} must have shape (n, *sample_shape) and {y_key} "
                           f"shape (n,) of class indices, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise DatasetError(f"{source}: {x_key} is empty (0 samples)")
    if len(x) != len(y):
        raise DatasetError(f"{source}: {x_key} has {len(x)} samples but {y_key} has {len(y)}")
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{source}: {x_key} must hold numbers, got dtype {x.dtype}")
    pixels = x.dtype == np.uint8
    x = x.astype(np.float32)
    if pixels:
        x /= np.float32(255.0)
    bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))
    if bad.size:
        raise DatasetError(f"{source}: {x_key} holds NaN or infinite values in "
                           f"{bad.size} sample(s), the first at index {bad[0]}")
    if y.dtype.kind in "iu":
        bad = np.flatnonzero(y < 0)
    elif y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y < 0) | (y != np.floor(y)))
    else:  # text: point at the first value that is not a number, if there is one
        text = pd.to_numeric(pd.Series(y), errors="coerce").isna().to_numpy()
        bad = np.flatnonzero(text) if text.any() else np.arange(len(y))
    if bad.size:
        raise DatasetError(f"{source}: {y_key} must hold class indices, integers >= 0; "
                           f"got {y[bad[:1]].tolist()[0]!r} at index {bad[0]}")
    return x, y.astype(np.int64)


def _split(source, x, y, seed):
    """The stratified 80/20 split: returns ``x_train, y_train, x_test, y_test``."""
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=_TEST_FRACTION, stratify=y, random_state=seed)
    except ValueError as e:
        raise DatasetError(f"{source}: cannot split {len(y)} samples 80/20 stratified by "
                           f"label ({_one_line(e)}); give x_train, y_train, x_test, y_test "
                           f"in a .npz instead") from None
    return x_train, y_train, x_test, y_test


def _dataset(name, source, x_train, y_train, x_test, y_test, num_classes=None):
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DatasetError(f"{source}: test samples have shape {x_test.shape[1:]} but "
                           f"training samples {x_train.shape[1:]}")
    largest = int(max(y_train.max(), y_test.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise DatasetError(f"{source}: label {largest} out of range; {name} has "
                           f"{num_classes} classes, 0..{num_classes - 1}")
    return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test,
                   y_test=y_test, num_classes=num_classes,
                   input_shape=tuple(x_train.shape[1:]), source=source)


def _one_line(error):
    """An exception's message on one line (pandas' end in a newline)."""
    return " ".join(str(error).split())
