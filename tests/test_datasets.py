"""Tests of projects.datasets against independent computations.

Built-in sets are compared with a second reading of their source (scikit-learn's
arrays, the raw bytes of the IDX files, CIFAR's documented row layout); users'
files are written here and must come back exactly; every contract violation must
raise a one-line DatasetError that names the bad value. Nothing reaches the
internet: the download URLs are pointed at local sockets.
"""

import collections
import doctest
import gzip
import math
import pickle
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from projects import datasets
from projects.datasets import DATASETS, Dataset, DatasetError, load_dataset

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
needs_debian_fashion_mnist = pytest.mark.skipif(
    not all((DEBIAN / f).is_file() for f in FASHION_FILES),
    reason=f"Debian's package dataset-fashion-mnist is not installed (no files in {DEBIAN})")


def pairs(x, y):
    """The multiset of (sample bytes, label): independent of order and split."""
    return collections.Counter(zip((row.tobytes() for row in x), y.tolist()))


def raises(name, *fragments, **kwargs):
    """load_dataset(name) must raise a one-line DatasetError containing fragments."""
    with pytest.raises(DatasetError) as info:
        load_dataset(name, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message
    return message


@pytest.fixture
def keras_datasets(tmp_path, monkeypatch):
    """An empty Keras cache of this test's own: ``$KERAS_HOME/datasets``."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "datasets"


@pytest.fixture
def refused_url(monkeypatch):
    """Download URLs on a local port that refuses connections (bound, not listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/data.tar.gz"
        monkeypatch.setattr(datasets, "_CIFAR10_URL", url)
        monkeypatch.setattr(datasets, "_FASHION_MNIST_URL", url)
        yield url


# --- digits -----------------------------------------------------------------------

def test_digits_is_sklearn_digits_over_16_split_80_20_stratified():
    ds = load_dataset("digits", seed=0)
    digits = load_digits()
    assert isinstance(ds, Dataset) and ds.name == "digits" and "scikit-learn" in ds.source
    assert (ds.num_classes, ds.input_shape) == (10, (8, 8))
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_test.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert (len(ds.x_test), len(ds.x_train)) == (360, 1797 - 360)  # ceil(0.2 * 1797)
    expected = (digits.data.reshape(-1, 8, 8) / 16).astype(np.float32)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # Train and test are disjoint and together the whole set, each image with its label.
    assert pairs(ds.x_train, ds.y_train) + pairs(ds.x_test, ds.y_test) \
        == pairs(expected, digits.target)
    # Stratified: every class has a fifth of its samples in test, to within one.
    for label, count in enumerate(np.bincount(digits.target)):
        assert abs(np.sum(ds.y_test == label) - 0.2 * count) <= 1


def test_digits_split_is_reproducible_for_a_seed_and_changes_with_it():
    a, b, c = (load_dataset("digits", seed=s) for s in (7, 7, 8))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.y_test, c.y_test)


def test_docstring_example_runs():
    result = doctest.testmod(datasets)
    assert result.attempted > 0 and result.failed == 0


def test_import_does_not_import_keras_or_tensorflow():
    code = ("import sys, projects.datasets; "
            "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- fashion_mnist from Debian's package ---------------------------------------------

@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion_mnist")


@needs_debian_fashion_mnist
def test_fashion_mnist_shapes_range_and_class_counts(fashion):
    assert fashion.source == str(DEBIAN)
    assert (fashion.num_classes, fashion.input_shape) == (10, (28, 28))
    assert fashion.x_train.shape == (60000, 28, 28) and fashion.x_test.shape == (10000, 28, 28)
    assert fashion.x_train.dtype == np.float32 and fashion.y_train.dtype == np.int64
    assert fashion.x_train.min() == 0.0 and fashion.x_train.max() == 1.0
    assert fashion.x_test.min() == 0.0 and fashion.x_test.max() == 1.0
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10


@needs_debian_fashion_mnist
@pytest.mark.parametrize("split, count", [("train", 60000), ("t10k", 10000)])
def test_fashion_mnist_pixels_and_labels_match_the_raw_idx_bytes(fashion, split, count):
    x, y = ((fashion.x_train, fashion.y_train) if split == "train"
            else (fashion.x_test, fashion.y_test))
    rng = np.random.default_rng(1)
    samples = sorted({0, count - 1, *rng.choice(count, 6, replace=False).tolist()})
    with gzip.open(DEBIAN / f"{split}-labels-idx1-ubyte.gz") as f:
        assert struct.unpack(">II", f.read(8)) == (0x801, count)
        labels = f.read()
    assert [labels[i] for i in samples] == y[samples].tolist()
    with gzip.open(DEBIAN / f"{split}-images-idx3-ubyte.gz") as f:
        assert struct.unpack(">IIII", f.read(16)) == (0x803, count, 28, 28)
        for i in samples:  # gzip seeks forward only: offsets in increasing order
            f.seek(16 + i * 784)
            image = struct.unpack("784B", f.read(784))  # row-major, 28 pixels a row
            for r, c in [(0, 0), (27, 27), *rng.integers(0, 28, size=(30, 2)).tolist()]:
                assert x[i, r, c] == np.float32(image[r * 28 + c] / 255)
            assert math.isclose(x[i].sum(dtype=np.float64), sum(image) / 255, rel_tol=1e-6)


# --- fashion_mnist from synthetic IDX files: Keras' cache, corrupt files -----------

def write_idx(path, array, magic=None, data=None):
    """Writes an IDX file of unsigned bytes, gzip'd; magic and data can be forged."""
    magic = 0x800 + array.ndim if magic is None else magic
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + (array.astype(np.uint8).tobytes() if data is None else data))


def write_fashion(directory, n_train=20, n_test=10, size=28, n_train_labels=None):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = np.arange(n if split == "t10k" or n_train_labels is None
                           else n_train_labels, dtype=np.uint8) % 10
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = images, labels
    return arrays


def test_fashion_mnist_falls_back_to_keras_cache(tmp_path, keras_datasets, monkeypatch):
    monkeypatch.setattr(datasets, "_DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    arrays = write_fashion(keras_datasets / "fashion-mnist")
    ds = load_dataset("fashion_mnist")
    assert ds.source == str(keras_datasets / "fashion-mnist")
    for (x, y), split in (((ds.x_train, ds.y_train), "train"), ((ds.x_test, ds.y_test), "t10k")):
        images, labels = arrays[split]
        np.testing.assert_array_equal(x, (images / 255.0).astype(np.float32))
        np.testing.assert_array_equal(y, labels.astype(np.int64))


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_DEBIAN_FASHION_MNIST", tmp_path / "fashion-mnist")
    return tmp_path / "fashion-mnist"


def test_fashion_mnist_bad_magic(fake_debian):
    write_fashion(fake_debian)
    labels = fake_debian / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(20), magic=0x803)
    raises("fashion_mnist", labels, "magic 00000803", "expected 00000801")


def test_fashion_mnist_data_shorter_than_header(fake_debian):
    write_fashion(fake_debian)
    images = fake_debian / "train-images-idx3-ubyte.gz"
    write_idx(images, np.zeros((20, 28, 28)), data=bytes(20 * 784 - 1))
    raises("fashion_mnist", images, "(20, 28, 28)", "15680 bytes", "15679 bytes")


@pytest.mark.parametrize("content", [b"not gzip at all",
                                     gzip.compress(np.random.default_rng(0).bytes(5000))[:100]],
                         ids=["not-gzip", "truncated-gzip"])
def test_fashion_mnist_unreadable_gzip(fake_debian, content):
    write_fashion(fake_debian)
    images = fake_debian / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(content)
    raises("fashion_mnist", images, "not a readable gzip file")


def test_fashion_mnist_wrong_image_size(fake_debian):
    write_fashion(fake_debian, size=32)
    raises("fashion_mnist", fake_debian / "train-images-idx3-ubyte.gz", "32x32", "28x28")


def test_fashion_mnist_images_and_labels_counts_differ(fake_debian):
    write_fashion(fake_debian, n_train_labels=19)
    raises("fashion_mnist", "train images has 20 samples but train labels has 19")


def test_fashion_mnist_label_out_of_range(fake_debian):
    write_fashion(fake_debian)
    write_idx(fake_debian / "t10k-labels-idx1-ubyte.gz", np.full(10, 12))
    raises("fashion_mnist", "label 12 out of range", "0..9")


def test_fashion_mnist_nowhere_and_offline_says_where_to_put_it(
        tmp_path, keras_datasets, refused_url, monkeypatch):
    monkeypatch.setattr(datasets, "_DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    raises("fashion_mnist", tmp_path / "not-installed", keras_datasets / "fashion-mnist",
           refused_url, "dataset-fashion-mnist", "train-images-idx3-ubyte.gz")


# --- cifar10 ----------------------------------------------------------------------

def write_cifar(directory, rows_per_batch=(2, 2, 2, 2, 2, 3)):
    """The python version's batches; returns the raw (n, 3072) rows and labels."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = []
    for name, n in zip(names, rows_per_batch):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                         b"filenames": [b"x.png"] * n}, f)
        written.append((rows, labels))
    return written


@pytest.mark.parametrize("layout", ["cifar-10-batches-py",
                                    "cifar-10-batches-py-target/cifar-10-batches-py"])
def test_cifar10_from_extracted_batches_in_keras_cache(keras_datasets, layout):
    written = write_cifar(keras_datasets / layout)
    ds = load_dataset("cifar10")
    assert ds.source == str(keras_datasets / layout)
    assert (ds.num_classes, ds.input_shape) == (10, (32, 32, 3))
    # A row holds the red, then green, then blue 32x32 plane, each row-major.
    r, c, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    train_rows = np.concatenate([rows for rows, _ in written[:5]])
    train_labels = sum((labels for _, labels in written[:5]), [])
    test_rows, test_labels = written[5]
    for x, y, rows, labels in ((ds.x_train, ds.y_train, train_rows, train_labels),
                               (ds.x_test, ds.y_test, test_rows, test_labels)):
        assert x.shape == (len(rows), 32, 32, 3) and x.dtype == np.float32
        np.testing.assert_array_equal(x, (rows[:, ch * 1024 + r * 32 + c] / 255.0)
                                      .astype(np.float32))
        assert y.tolist() == labels and y.dtype == np.int64


def test_cifar10_corrupt_batch(keras_datasets):
    write_cifar(keras_datasets / "cifar-10-batches-py")
    batch = keras_datasets / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"\x80\x04garbage")
    raises("cifar10", batch, "not a CIFAR-10 python batch")


def test_cifar10_offline_fails_fast_saying_how_to_provide_it(keras_datasets, refused_url):
    (keras_datasets / "cifar-10-batches-py").mkdir(parents=True)  # incomplete: no batches
    start = time.monotonic()
    message = raises("cifar10", refused_url, keras_datasets, "$KERAS_HOME",
                     keras_datasets / "cifar-10-batches-py" / "data_batch_1", ".npz")
    assert time.monotonic() - start < 5, message


def test_cifar10_download_host_that_never_answers_times_out(keras_datasets, monkeypatch):
    """A firewall that drops packets would hang Keras' downloader: this must not."""
    monkeypatch.setattr(datasets, "_DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cifar-10-python.tar.gz"
        monkeypatch.setattr(datasets, "_CIFAR10_URL", url)
        start = time.monotonic()
        raises("cifar10", url, "timed out")
        assert time.monotonic() - start < 5


# --- users' .npz files ------------------------------------------------------------

def test_npz_with_test_split_uint8_scaled_and_labels_flattened(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    y_train = (np.arange(12) % 3).reshape(-1, 1).astype(np.float32)  # (n, 1), whole floats
    y_test = np.array([0, 1, 2, 5, 1], dtype=np.uint8)
    path = tmp_path / "images.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load_dataset(str(path), seed=123)
    assert (ds.name, ds.source) == (str(path), str(path))
    np.testing.assert_array_equal(ds.x_train, (x_train / 255.0).astype(np.float32))
    np.testing.assert_array_equal(ds.x_test, (x_test / 255.0).astype(np.float32))
    assert ds.y_train.tolist() == [0, 1, 2] * 4 and ds.y_test.tolist() == [0, 1, 2, 5, 1]
    assert ds.y_train.dtype == np.int64 and ds.x_train.dtype == np.float32
    assert (ds.num_classes, ds.input_shape) == (6, (4, 4, 3))


def test_npz_float_data_kept_as_given(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(8, 5)).astype(np.float32) * 1000
    x_test = rng.normal(size=(3, 5))  # float64: only narrowed to float32
    path = tmp_path / "features.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(8) % 2, x_test=x_test,
             y_test=np.array([1, 0, 1]))
    ds = load_dataset(path)
    assert ds.x_train.tobytes() == x_train.tobytes()
    assert ds.x_test.tobytes() == x_test.astype(np.float32).tobytes()
    assert ds.num_classes == 2


@pytest.mark.parametrize("keys", [("x", "y"), ("x_train", "y_train")])
def test_npz_without_test_split_is_split_80_20(tmp_path, keys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = np.repeat([0, 1, 3, 4, 2], 10)  # labels need not be sorted or dense-ordered
    path = tmp_path / "xy.npz"
    np.savez(path, **dict(zip(keys, (x, y))))
    ds = load_dataset(path, seed=5)
    assert (len(ds.x_train), len(ds.x_test)) == (40, 10)
    assert sorted(ds.y_test.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert pairs(ds.x_train, ds.y_train) + pairs(ds.x_test, ds.y_test) == pairs(x, y)
    assert ds.num_classes == 5


# --- users' .csv files ------------------------------------------------------------

@pytest.mark.parametrize("label", ["label", "y"])
def test_csv_round_trips_exactly(tmp_path, label):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    x[:, 2] = rng.integers(0, 256, size=30)  # integers stay integers: no /255 in a csv
    y = np.arange(30) % 3
    lines = [f"f0,{label},f1,f2"]  # the label column need not be the last
    lines += [f"{float(a)!r},{int(t)},{float(b)!r},{int(c)}" for (a, b, c), t in zip(x, y)]
    path = tmp_path / "table.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, seed=2)
    assert (len(ds.x_train), len(ds.x_test), ds.input_shape, ds.num_classes) == (24, 6, (3,), 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert pairs(ds.x_train, ds.y_train) + pairs(ds.x_test, ds.y_test) == pairs(x, y)
    assert np.bincount(ds.y_test).tolist() == [2, 2, 2]


# --- contract violations ----------------------------------------------------------

def npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def csv(tmp_path, text):
    return write(tmp_path / "data.csv", text.encode())


def write(path, content):
    path.write_bytes(content)
    return path


X6 = np.zeros((6, 4), np.float32)
Y6 = np.array([0, 1, 0, 1, 0, 1])
NAN_X = X6.copy()
NAN_X[2, 1] = np.nan
INF_X = X6.copy()
INF_X[4, 0] = -np.inf

# (make the name from tmp_path, fragments the message must contain; "{path}" is the file)
ERRORS = {
    "unknown name": (lambda t: "mnist",
                     ["'mnist'", "digits, fashion_mnist, cifar10", ".npz or .csv"]),
    "unknown suffix": (lambda t: str(write(t / "data.txt", b"a,label\n")),
                       ["data.txt'", "digits, fashion_mnist, cifar10"]),
    "missing npz": (lambda t: t / "absent.npz", ["{path}", "not found"]),
    "missing csv": (lambda t: t / "absent.csv", ["{path}", "not found"]),
    "npz is text": (lambda t: write(t / "data.npz", b"x,y\n"),
                    ["{path}", "not an .npz archive"]),
    "npz is a lone npy": (lambda t: _npy_as_npz(t), ["{path}", "not an .npz archive"]),
    "npz with object array": (lambda t: npz(t, x=np.array([{}, {}], object), y=Y6[:2]),
                              ["{path}", "Object arrays cannot be loaded"]),
    "npz wrong keys": (lambda t: npz(t, images=X6, labels=Y6),
                       ["['images', 'labels']", "expected x_train, y_train", "or x, y"]),
    "npz x_test without y_test": (lambda t: npz(t, x_train=X6, y_train=Y6, x_test=X6),
                                  ["['x_test', 'x_train', 'y_train']"]),
    "lengths differ": (lambda t: npz(t, x=np.zeros((10, 4)), y=np.zeros(9, int)),
                       ["x has 10 samples but y has 9"]),
    "fractional label": (lambda t: npz(t, x=X6, y=np.array([0, 1, 0, 0.5, 1, 0])),
                         ["y must hold class indices", "got 0.5 at index 3"]),
    "negative label": (lambda t: npz(t, x_train=X6, y_train=Y6, x_test=X6[:2],
                                     y_test=np.array([0, -1])),
                       ["y_test must hold class indices", "got -1 at index 1"]),
    "string labels": (lambda t: npz(t, x=X6, y=np.array(list("abcabc"))),
                      ["got 'a' at index 0"]),
    "nan in x": (lambda t: npz(t, x=NAN_X, y=Y6), ["x holds NaN or infinite", "index 2"]),
    "inf in x": (lambda t: npz(t, x=INF_X, y=Y6), ["x holds NaN or infinite", "index 4"]),
    "empty": (lambda t: npz(t, x=np.zeros((0, 4)), y=np.zeros(0, int)),
              ["x is empty (0 samples)"]),
    "one-hot labels": (lambda t: npz(t, x=X6, y=np.eye(2)[Y6]), ["(6, 4) and (6, 2)"]),
    "x with no sample axis": (lambda t: npz(t, x=np.zeros(6), y=Y6), ["(6,) and (6,)"]),
    "text x": (lambda t: npz(t, x=np.array([list("abcd")] * 6), y=Y6), ["dtype <U1"]),
    "test shape differs": (lambda t: npz(t, x_train=X6, y_train=Y6, x_test=np.zeros((2, 5)),
                                         y_test=Y6[:2]),
                           ["test samples have shape (5,)", "training samples (4,)"]),
    "class of one sample": (lambda t: npz(t, x=X6, y=np.array([0, 0, 0, 1, 1, 2])),
                            ["cannot split 6 samples", "x_test, y_test in a .npz"]),
    "csv without label column": (lambda t: csv(t, "a,b\n1,2\n"),
                                 ["'label' or 'y'", "found columns ['a', 'b']"]),
    "csv with label and y": (lambda t: csv(t, "label,y\n1,2\n"),
                             ["found columns ['label', 'y']"]),
    "csv ragged": (lambda t: csv(t, "a,label\n1,0\n1,0,3,4\n"),
                   ["{path}", "Expected 2 fields in line 3, saw 4"]),
    "csv binary": (lambda t: write(t / "data.csv", b"\xff\xfe\x00\x01"),
                   ["{path}", "cannot read as CSV"]),
    "csv empty file": (lambda t: csv(t, ""), ["{path}", "No columns to parse"]),
    "csv header only": (lambda t: csv(t, "a,b,label\n"),
                        ["found 0 rows", "feature columns ['a', 'b']"]),
    "csv only a label": (lambda t: csv(t, "label\n0\n1\n"),
                         ["found 2 rows", "feature columns []"]),
    "csv text feature": (lambda t: csv(t, "size,colour,label\n1,red,0\n2,blue,1\n"),
                         ["['colour'] do not"]),
    "csv text label": (lambda t: csv(t, "a,label\n1,0\n2,cat\n"),
                       ["column 'label' must hold class indices", "got 'cat' at index 1"]),
    "csv missing label": (lambda t: csv(t, "a,label\n1,0\n2,\n3,1\n"),
                          ["column 'label'", "got nan at index 1"]),
    "csv nan feature": (lambda t: csv(t, "a,label\n1,0\nnan,1\n"),
                        ["features holds NaN or infinite", "index 1"]),
}


def _npy_as_npz(tmp_path):
    path = tmp_path / "data.npz"
    with open(path, "wb") as f:
        np.save(f, X6)
    return path


@pytest.mark.parametrize("case", list(ERRORS))
def test_contract_violation_names_the_bad_value(tmp_path, case):
    make, fragments = ERRORS[case]
    name = make(tmp_path)
    path = str(Path(name).absolute())
    fragments = [f.replace("{path}", path) for f in fragments]
    message = raises(name, *fragments)
    if Path(name).suffix in (".npz", ".csv") and Path(name).exists():
        assert message.startswith(path)  # which file is at fault, first


def test_dataset_error_is_a_value_error_and_datasets_lists_the_names():
    assert issubclass(DatasetError, ValueError)
    assert DATASETS == ("digits", "fashion_mnist", "cifar10")
