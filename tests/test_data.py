"""splitedge.runtime_edge.data: IDX/CIFAR-10/folder/synthetic loading, partitions, batches.

Every fixture file is written by the test itself (tmp_path); the real Fashion-MNIST
test runs only where Debian's dataset-fashion-mnist is installed.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitedge.runtime_edge import data as D

# ---------------------------------------------------------------------------
# helpers: IDX writer


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> Path:
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[arr.dtype.newbyteorder("=").str[1:]]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob, mtime=0))
    else:
        path.write_bytes(blob)
    return path


def make_idx_dir(
    root: Path, *, n_train: int = 30, n_test: int = 12, gz_train: bool = True, gz_test: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr, gz=gz_train if name.startswith("train") else gz_test)
    return arrays


# ---------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_round_trips_every_type_code(tmp_path, gz, dtype):
    # prepare
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / "x-idx3-ubyte", arr, gz=gz)
    # execute
    out = D.read_idx(path)
    # assert
    assert out.shape == (3, 4, 5)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, arr)


def test_idx_spec_loads_both_splits_normalized_with_mnist_constants(tmp_path):
    # prepare: train gzipped, test plain
    arrays = make_idx_dir(tmp_path / "m", gz_train=True, gz_test=False)
    # execute
    train = D.load(f"idx:{tmp_path / 'm'}", split="train")
    test = D.load(f"idx:{tmp_path / 'm'}", split="test")
    # assert
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (12, 1, 28, 28)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int64
    assert train.input_shape == (1, 28, 28)
    expected = (arrays["train-images-idx3-ubyte"] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(train.images[:, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(test.labels, arrays["t10k-labels-idx1-ubyte"])
    assert train.num_classes == test.num_classes == int(arrays["train-labels-idx1-ubyte"].max()) + 1


def test_fashion_mnist_dir_spec_uses_fashion_classes_and_constants(tmp_path):
    # prepare
    arrays = make_idx_dir(tmp_path / "f")
    # execute
    ds = D.load(f"fashion-mnist:{tmp_path / 'f'}", split="train")
    # assert
    assert ds.name == "fashion-mnist"
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)
    expected = (arrays["train-images-idx3-ubyte"] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.images[:, 0], expected, atol=1e-5)


def test_normalize_false_leaves_pixels_over_255(tmp_path):
    arrays = make_idx_dir(tmp_path / "m")
    ds = D.load(f"mnist:{tmp_path / 'm'}", split="test", normalize=False)
    np.testing.assert_allclose(ds.images[:, 0], arrays["t10k-images-idx3-ubyte"] / 255.0, atol=1e-7)


RANDOM_25K = np.random.default_rng(0).integers(0, 256, 25_000, dtype=np.uint8).tobytes()


def _flip_middle(blob: bytes) -> bytes:
    mid = len(blob) // 2
    return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1 :]


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    "blob, gz, message",
    [
        (b"\x01\x02\x08\x01" + struct.pack(">I", 2) + b"ab", False, "not an IDX file"),
        (_header(0x07, (2,)) + b"ab", False, "unknown IDX type code 0x07"),
        (bytes([0, 0, 8, 0]), False, "rank 0 out of range"),
        (_header(0x08, (2, 3, 3)) + bytes(10), False, "truncated"),
        (_header(0x08, (2,)) + bytes(5), False, "trailing bytes"),
        (b"\x00\x00", False, "ended inside the header"),
        (_header(0x08, (4, 2, 2)), False, "truncated"),
        (gzip.compress(_header(0x08, (1000, 5, 5)) + RANDOM_25K, mtime=0)[:-100], True, "truncated or corrupt"),
        (_flip_middle(gzip.compress(_header(0x08, (1000, 5, 5)) + RANDOM_25K, mtime=0)), True, "cannot read IDX file"),
        (gzip.compress(_header(0x08, (4, 2, 2)) + bytes(8), mtime=0), True, "gzip trailer says"),
        (b"not gzip at all, really not" * 2, True, "cannot read IDX file"),
        (gzip.compress(_header(0x08, (60000, 60000, 28)), mtime=0), True, "more than a .*-byte gzip file can hold"),
    ],
    ids=["magic", "type-code", "rank-0", "truncated", "trailing", "short-header", "no-data", "gz-truncated", "gz-corrupt", "gz-short-data", "gz-garbage", "gz-huge-header"],
)
def test_read_idx_rejects_corrupt_files_with_a_clear_message(tmp_path, blob, gz, message):
    # prepare
    path = tmp_path / ("bad-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(blob)
    # execute / assert
    with pytest.raises(D.DatasetError, match=message) as err:
        D.read_idx(path)
    assert str(path) in str(err.value)


def test_idx_dataset_rejects_count_mismatch_between_images_and_labels(tmp_path):
    # prepare
    make_idx_dir(tmp_path / "m", n_test=12)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8))
    # execute / assert
    with pytest.raises(D.DatasetError, match="12 images but .* 11 labels"):
        D.load(f"idx:{tmp_path / 'm'}", split="test")


def test_idx_dataset_rejects_labels_out_of_range_for_named_dataset(tmp_path):
    make_idx_dir(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(D.DatasetError, match="label 10 out of range"):
        D.load(f"fashion-mnist:{tmp_path / 'm'}", split="test")


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    # prepare: point the default (read by parse_spec, in data.spec) at an empty location
    monkeypatch.setattr(D.spec, "FASHION_MNIST_DIR", tmp_path / "absent")
    # execute / assert
    with pytest.raises(D.DatasetError, match=r"sudo apt-get install dataset-fashion-mnist"):
        D.load("fashion-mnist", split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match=r"no train-images-idx3-ubyte\[\.gz\].*apt-get install dataset-fash"):
        D.load(f"fashion-mnist:{tmp_path / 'empty'}", split="train")


@pytest.mark.dataset
@pytest.mark.skipif(
    not D.FASHION_MNIST_DIR.is_dir(), reason=f"{D.FASHION_MNIST_DIR} absent: sudo apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist():
    # execute
    train = D.load("fashion-mnist", split="train")
    test = D.load("fashion-mnist", split="test")
    # assert
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == np.int64 and train.images.dtype == np.float32
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
    # the documented constants standardize the training set
    assert abs(float(train.images.mean(dtype=np.float64))) < 2e-3
    assert abs(float(train.images.std(dtype=np.float64)) - 1.0) < 2e-3


# ---------------------------------------------------------------------------
# CIFAR-10: a Python 2 cPickle protocol-2 writer, opcode for opcode


class Py2Pickler:
    """Writes what Python 2's cPickle.dump(obj, f, 2) writes for CIFAR-10's batch dicts.

    str -> SHORT_BINSTRING/BINSTRING, ints -> BININT1/BININT2/BININT, memoized with
    BINPUT/LONG_BINPUT, lists/dicts in batches of 1000 with MARK ... APPENDS/SETITEMS,
    and a numpy array as numpy.core.multiarray._reconstruct + BUILD, as numpy 1.x
    under Python 2 pickles it.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self) -> None:
        self.memo += 1
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def str_(self, s: bytes, memo: bool = True) -> None:
        self.out += (b"U" + bytes([len(s)])) if len(s) < 256 else (b"T" + struct.pack("<i", len(s)))
        self.out += s
        if memo:
            self.put()

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        else:
            self.out += b"J" + struct.pack("<i", v)

    def array(self, a: np.ndarray) -> None:
        self.out += b"cnumpy.core.multiarray\n_reconstruct\n"
        self.put()
        self.out += b"cnumpy\nndarray\n"
        self.put()
        self.out += b"K\x00\x85U\x01b\x87R"
        self.put()
        self.out += b"(K\x01"
        for d in a.shape:
            self.int_(d)
        self.out += b"\x86" if a.ndim == 2 else b"\x85"
        self.out += b"cnumpy\ndtype\n"
        self.put()
        self.out += b"U\x02u1K\x00K\x01\x87R"
        self.put()
        self.out += b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        self.str_(a.tobytes(), memo=True)
        self.out += b"tb"

    def value(self, v: object) -> None:
        if isinstance(v, bytes):
            self.str_(v)
        elif isinstance(v, int):
            self.int_(v)
        elif isinstance(v, np.ndarray):
            self.array(v)
        elif isinstance(v, list):
            self.out += b"]"
            self.put()
            for i in range(0, len(v), 1000):
                self.out += b"("
                for item in v[i : i + 1000]:
                    self.value(item)
                self.out += b"e"
        elif isinstance(v, dict):
            self.out += b"}"
            self.put()
            self.out += b"("
            for k, item in v.items():
                self.value(k)
                self.value(item)
            self.out += b"u"
        else:
            raise TypeError(type(v))

    def dumps(self, obj: object) -> bytes:
        self.value(obj)
        self.out += b"."
        return bytes(self.out)


def cifar_batch(n: int, seed: int, label: bytes) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    d = {
        b"data": data,
        b"labels": labels,
        b"batch_label": label,
        b"filenames": [b"img_%06d.png" % (seed * 1000 + i) for i in range(n)],
    }
    return d, data, labels


def make_cifar_dir(root: Path, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        d, data, labels = cifar_batch(n, i, b"training batch %d of 5" % i)
        (root / f"data_batch_{i}").write_bytes(Py2Pickler().dumps(d))
        xs.append(data)
        ys += labels
    d, tdata, tlabels = cifar_batch(n, 9, b"testing batch 1 of 1")
    (root / "test_batch").write_bytes(Py2Pickler().dumps(d))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(Py2Pickler().dumps(meta))
    return np.concatenate(xs), np.array(ys), tdata, np.array(tlabels)


def test_py2_writer_matches_the_standard_unpickler():
    """The fixture writer itself is checked against pickle (on bytes we wrote; never on foreign files)."""
    d, data, labels = cifar_batch(1200, 3, b"training batch 3 of 5")  # > 1000 items: several APPENDS
    blob = Py2Pickler().dumps(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns that numpy.core is deprecated
        ref = pickle.loads(blob, encoding="bytes")
    np.testing.assert_array_equal(ref[b"data"], data)
    assert ref[b"labels"] == labels and ref[b"filenames"] == d[b"filenames"]


def test_safe_unpickle_reads_the_official_python2_layout():
    # prepare
    d, data, labels = cifar_batch(1200, 3, b"training batch 3 of 5")
    blob = Py2Pickler().dumps(d)
    # execute
    out = D.safe_unpickle(blob)
    # assert
    assert set(out) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert out[b"data"].dtype == np.uint8 and out[b"data"].shape == (1200, 3072)
    np.testing.assert_array_equal(out[b"data"], data)
    assert out[b"labels"] == labels
    assert out[b"batch_label"] == b"training batch 3 of 5"
    assert out[b"filenames"] == d[b"filenames"]


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_safe_unpickle_reads_python3_repickled_batches(protocol):
    # prepare: the same dict as Python 3 + numpy 2 pickle it (protocol 5: numpy's _frombuffer form)
    d, data, labels = cifar_batch(20, 4, b"training batch 4 of 5")
    d[b"labels_np"] = np.array(labels, dtype=np.int64)
    d[b"big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    d["meta"] = {"f": 1.5, "t": (1, None, True), "big": 2**70}
    blob = pickle.dumps(d, protocol=protocol)
    # execute
    out = D.safe_unpickle(blob)
    # assert
    np.testing.assert_array_equal(out[b"data"], data)
    np.testing.assert_array_equal(out[b"labels_np"], labels)
    assert out[b"big_endian"].dtype == np.dtype("f4") and out[b"big_endian"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out[b"labels"] == labels and out[b"filenames"] == d[b"filenames"]
    assert out["meta"] == {"f": 1.5, "t": (1, None, True), "big": 2**70}


@pytest.mark.parametrize("protocol", [0, 2])
def test_python3_low_protocol_arrays_are_refused_by_name(protocol):
    """Python 3 writes bytes at protocols 0-2 through _codecs.encode, which is not an array-reconstruct name."""
    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=protocol)
    with pytest.raises(D.UnsafePickleError, match=r"refusing global _codecs\.encode"):
        D.safe_unpickle(blob)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_cifar10_loads_train_and_test(tmp_path, nested):
    # prepare
    root = tmp_path / "c"
    x_train, y_train, x_test, y_test = make_cifar_dir(root / "cifar-10-batches-py" if nested else root, n=8)
    # execute
    train = D.load(f"cifar10:{root}", split="train")
    test = D.load(f"cifar10:{root}", split="test")
    # assert
    assert train.images.shape == (40, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(train.labels, y_train)
    np.testing.assert_array_equal(test.labels, y_test)
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    # channel planes: first 1024 bytes red, then green, then blue, each row-major 32x32
    mean, std = np.array(D.NORMALIZATION["cifar10"].mean), np.array(D.NORMALIZATION["cifar10"].std)
    expected = (x_train.reshape(40, 3, 32, 32) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(train.images, expected, atol=1e-5)
    assert train.images[3, 1, 2, 5] == pytest.approx((x_train[3, 1024 + 2 * 32 + 5] / 255 - 0.4822) / 0.2435, abs=1e-5)


def test_cifar10_missing_dir_says_where_to_download(tmp_path):
    with pytest.raises(D.DatasetError, match=r"cifar-10-python\.tar\.gz.*cifar10:DIR"):
        D.load(f"cifar10:{tmp_path / 'nope'}", split="train")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data_batch_1").write_bytes(Py2Pickler().dumps(cifar_batch(2, 1, b"x")[0]))
    with pytest.raises(D.DatasetError, match="no data_batch_2, data_batch_3"):
        D.load(f"cifar10:{tmp_path / 'half'}", split="train")


def test_cifar10_rejects_malformed_batches(tmp_path):
    # prepare: right pickle, wrong content
    root = tmp_path / "c"
    make_cifar_dir(root, n=4)
    d, _, _ = cifar_batch(4, 9, b"t")
    d[b"labels"] = d[b"labels"][:3]
    (root / "test_batch").write_bytes(Py2Pickler().dumps(d))
    # execute / assert
    with pytest.raises(D.DatasetError, match="4 images but 3 labels"):
        D.load(f"cifar10:{root}", split="test")
    d[b"labels"] = [0, 1, 2, 12]
    (root / "test_batch").write_bytes(Py2Pickler().dumps(d))
    with pytest.raises(D.DatasetError, match="labels must lie in 0..9"):
        D.load(f"cifar10:{root}", split="test")


def make_cifar_bin_dir(root: Path, n: int = 8, *, meta: bool = True) -> tuple[np.ndarray, ...]:
    """The binary version: 3073-byte records (label byte + 3072 pixels) in data_batch_i.bin / test_batch.bin."""
    root.mkdir(parents=True)
    xs, ys = [], []
    for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        _, data, labels = cifar_batch(n, 20 + i, b"")
        (root / name).write_bytes(np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1).tobytes())
        xs.append(data)
        ys.append(np.array(labels))
    if meta:
        names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "cifar-10-batches-bin"])
def test_cifar10_binary_version_loads_train_and_test(tmp_path, nested):
    # prepare
    root = tmp_path / "c"
    x_train, y_train, x_test, y_test = make_cifar_bin_dir(root / "cifar-10-batches-bin" if nested else root)
    # execute
    train = D.load(f"cifar10:{root}", split="train")
    test = D.load(f"cifar10:{root}", split="test", normalize=False)
    # assert
    assert train.images.shape == (40, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)
    np.testing.assert_array_equal(train.labels, y_train)
    np.testing.assert_array_equal(test.labels, y_test)
    assert train.classes[0] == "plane" and train.classes[9] == "truck"  # from batches.meta.txt
    mean, std = np.array(D.NORMALIZATION["cifar10"].mean), np.array(D.NORMALIZATION["cifar10"].std)
    expected = (x_train.reshape(40, 3, 32, 32) / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(train.images, expected, atol=1e-5)
    np.testing.assert_allclose(test.images, x_test.reshape(8, 3, 32, 32) / 255.0, atol=1e-7)


def test_cifar10_binary_and_python_versions_of_the_same_data_load_equal(tmp_path):
    # prepare: both versions side by side, as after unpacking both archives into one folder
    x_train, y_train, _, _ = make_cifar_dir(tmp_path / "c" / "cifar-10-batches-py", n=4)
    bin_dir = tmp_path / "c" / "cifar-10-batches-bin"
    bin_dir.mkdir()
    for i in range(5):
        rows = slice(4 * i, 4 * i + 4)  # the python version's batch i + 1
        records = np.concatenate([y_train[rows].astype(np.uint8)[:, None], x_train[rows]], axis=1)
        (bin_dir / f"data_batch_{i + 1}.bin").write_bytes(records.tobytes())
    # execute: the binary version is preferred; the python one is read when it is alone
    both = D.load(f"cifar10:{tmp_path / 'c'}", split="train")
    py = D.load(f"cifar10:{tmp_path / 'c' / 'cifar-10-batches-py'}", split="train")
    # assert
    np.testing.assert_array_equal(both.images, py.images)
    np.testing.assert_array_equal(both.labels, py.labels)
    assert both.classes == py.classes == D.CIFAR10_CLASSES  # no batches.meta.txt: the standard names
    (bin_dir / "data_batch_3.bin").unlink()
    with pytest.raises(D.DatasetError, match="cifar-10-batches-bin has no data_batch_3.bin"):
        D.load(f"cifar10:{tmp_path / 'c'}", split="train")


@pytest.mark.parametrize(
    "case, message",
    [
        ("not-whole-records", "not a whole number of 3073-byte records"),
        ("empty", "0 bytes is not a whole number"),
        ("label-out-of-range", "record 1 has label 12; CIFAR-10 labels lie in 0..9"),
        ("meta-nine-names", "expected 10 class names, one per line, found 9"),
        ("too-large", "9219 bytes, over the 5000-byte limit"),
    ],
)
def test_cifar10_binary_version_rejects_malformed_files(tmp_path, monkeypatch, case, message):
    # prepare
    root = tmp_path / "c"
    make_cifar_bin_dir(root, n=3)
    path = root / "test_batch.bin"
    blob = bytearray(path.read_bytes())
    if case == "not-whole-records":
        path.write_bytes(bytes(blob[:-1]))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "label-out-of-range":
        blob[3073] = 12
        path.write_bytes(bytes(blob))
    elif case == "meta-nine-names":
        (root / "batches.meta.txt").write_text("a\nb\nc\nd\ne\nf\ng\nh\ni\n")
    elif case == "too-large":
        monkeypatch.setattr(D.cifar10, "MAX_BATCH_BYTES", 5000)
    # execute / assert
    with pytest.raises(D.DatasetError, match=message):
        D.load(f"cifar10:{root}", split="test")


def test_safe_unpickle_bounds_what_it_builds(monkeypatch):
    """A pickle may not rebuild more array bytes than it holds, nest without bound, or exceed the size limit."""
    # prepare: one 3072-byte buffer (memoized once), then ten arrays that each GET it again
    head = b"\x80\x02(" + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
    state = b"(K\x01M\x00\x0c\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
    first = head + state + b"T\x00\x0c\x00\x00" + bytes(3072) + b"q\x01tb"
    again = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R" + state + b"h\x01tb"
    blob = first + again * 10 + b"l."
    nested = b"\x80\x02" + b"]" * 100 + b"a" * 99 + b"."
    # execute / assert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(pickle.loads(blob, encoding="bytes")) == 11  # the standard unpickler builds them all
    assert len(D.safe_unpickle(first + b"l.")) == 1
    with pytest.raises(D.UnsafePickleError, match="arrays hold more bytes than the file"):
        D.safe_unpickle(blob)
    with pytest.raises(D.UnsafePickleError, match="nests containers more than 64 deep"):
        D.safe_unpickle(nested)
    monkeypatch.setattr(D.cifar10, "MAX_BATCH_BYTES", len(blob) - 1)
    with pytest.raises(D.UnsafePickleError, match=f"pickle of {len(blob)} bytes exceeds the {len(blob) - 1}-byte limit"):
        D.safe_unpickle(blob)


class Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    # prepare: a batch whose labels entry runs a shell command when unpickled
    sentinel = tmp_path / "pwned"
    root = tmp_path / "c"
    make_cifar_dir(root, n=2)
    # (str keys, the hostile entry first: at protocols 0-2 Python 3 writes bytes through _codecs.encode,
    # itself refused, and the test is about the global that would run a command)
    blob = pickle.dumps({"labels": Evil(sentinel), "data": np.zeros((1, 3072), np.uint8)}, protocol=protocol)
    (root / "test_batch").write_bytes(blob)
    # execute / assert
    with pytest.raises(D.UnsafePickleError, match=r"refusing global (posix|nt)\.system") as err:
        D.load(f"cifar10:{root}", split="test")
    assert "test_batch" in str(err.value)
    assert isinstance(err.value, D.DatasetError) and isinstance(err.value, ValueError)
    assert not sentinel.exists()


GOOD_ARRAY_HEAD = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "refusing global builtins.eval"),
        (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy.ma.core\nMaskedArray\nK\x00\x85U\x01b\x87R.", "refusing global numpy.ma.core.MaskedArray"),
        (GOOD_ARRAY_HEAD + b"(K\x01K\x01\x85cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R", "refusing numpy dtype 'O8'"),
        (b"\x80\x02cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NU\x01a\x85}(U\x01aK\x01uJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.", "only plain numeric dtypes"),
        (GOOD_ARRAY_HEAD + b"(K\x01K\x04\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03abctb.", "needs 4 bytes, the pickle holds 3"),
        (b"\x80\x02}(U\x01aK\x01u}b.", "malformed pickle: AttributeError"),
        (b"\x80\x02]K\x01\x85R.", "malformed pickle: TypeError: 'list' object is not callable"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", "refusing global _codecs.encode"),
        (b"\x80\x02ccopy_reg\n_reconstructor\n.", "refusing global copy_reg._reconstructor"),
        (b"\x80\x02cnumpy\nndarray\n)\x81.", "refusing to call numpy.ndarray"),
        (b"\x80\x02K\x01Q.", "refusing a persistent id"),
        (b"\x80\x02\x82\x01.", "malformed pickle: ValueError: unregistered extension code 1"),
        (b"\x80\x02(K\x01K\x02\x8f.", "refusing a set"),
        (b"\x80\x02T\xff\xff\xff\x7fab.", "malformed pickle: .*expected 2147483647 bytes .* but only 3 remain"),
        (b"\x80\x02}q\x01", "malformed pickle"),
        (b"\x80\x02h\x05.", "malformed pickle: .*[Mm]emo"),
        (b"\x80\x02cnumpy\ndtype\n.", "returns the global numpy.dtype"),
        (b"\x80\x02Nr\xff\xff\xff\xff.", "refusing memo index 4294967295 at offset 3"),
        (b"(lp0\nI1\nap999999999\n.", "refusing memo index 999999999"),
    ],
    ids=["eval", "subclass", "object-dtype", "structured-dtype", "short-data", "build-dict", "call-list", "codecs", "copy_reg", "newobj", "persid", "ext", "set", "truncated", "no-stop", "memo", "bare-global",
         "memo-index-64GiB", "memo-index-text"],
)
def test_safe_unpickle_refuses_everything_else(blob, message):
    with pytest.raises(D.UnsafePickleError, match=message):
        D.safe_unpickle(blob)


def test_safe_unpickle_fails_cleanly_on_corrupted_input():
    """Random byte flips and truncations: a result or UnsafePickleError, never another exception."""
    # prepare
    d, _, _ = cifar_batch(3, 1, b"b")
    good = Py2Pickler().dumps(d)
    rng = np.random.default_rng(7)
    outcomes = {"parsed": 0, "refused": 0}
    # execute / assert: any other exception fails the test
    for trial in range(1500):
        blob = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            blob[int(rng.integers(0, len(blob)))] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            blob = blob[: int(rng.integers(0, len(blob)))]
        try:
            D.safe_unpickle(bytes(blob))
            outcomes["parsed"] += 1
        except D.UnsafePickleError:
            outcomes["refused"] += 1
    # the corruption reaches both paths (flips in the array bytes parse; broken opcodes are refused)
    assert outcomes["parsed"] > 100 and outcomes["refused"] > 100, outcomes


# ---------------------------------------------------------------------------
# folder (HAM10000 layout and labels.csv)


def _write_ham(root: Path, Image) -> dict[str, tuple[str, str]]:
    """3 classes; 'nv' has 10 images on 8 lesions; images split over two part folders."""
    colors = {"akiec": (250, 10, 10), "mel": (10, 250, 10), "nv": (10, 10, 250)}
    rows = []
    counter = 0
    for dx, n_lesions in (("nv", 8), ("mel", 5), ("akiec", 3)):
        for lesion in range(n_lesions):
            for _ in range(2 if dx == "nv" and lesion < 2 else 1):
                rows.append((f"HAM_{lesion:07d}_{dx}", f"ISIC_{counter:07d}", dx))
                counter += 1
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "HAM10000_images_part_2").mkdir()
    for i, (_, image_id, dx) in enumerate(rows):
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        Image.new("RGB", (60, 45), colors[dx]).save(part / f"{image_id}.jpg", quality=95)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        f.write("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
        for lesion, image_id, dx in reversed(rows):  # CSV order must not matter
            f.write(f"{lesion},{image_id},{dx},histo,50.0,male,back\n")
    return {image_id: (lesion, dx) for lesion, image_id, dx in rows}


def test_folder_ham10000_split_is_stratified_grouped_and_seeded(tmp_path):
    # prepare
    from PIL import Image
    meta = _write_ham(tmp_path / "ham", Image)
    spec = f"folder:{tmp_path / 'ham'}"
    # execute
    train = D.load(spec, split="train", image_size=(8, 12))
    test = D.load(spec, split="test", image_size=(8, 12))
    again = D.load(spec, split="test", image_size=(8, 12))
    other_seeds = {D.load(spec, split="test", image_size=(8, 12), split_seed=s).ids for s in range(1, 6)}
    # assert
    assert train.classes == test.classes == ("akiec", "mel", "nv")
    assert train.images.shape == (len(train), 3, 8, 12) and train.input_shape == (3, 8, 12)
    assert set(train.ids).isdisjoint(test.ids) and set(train.ids) | set(test.ids) == set(meta)
    assert again.ids == test.ids and np.array_equal(again.images, test.images)
    assert len(other_seeds - {test.ids}) >= 1
    test_lesions = {meta[i][0] for i in test.ids}
    assert test_lesions.isdisjoint({meta[i][0] for i in train.ids})  # a lesion never straddles the split
    # per class round(0.2 * lesions), at least 1: nv 8 -> 2, mel 5 -> 1, akiec 3 -> 1 (0.6 rounds to 1)
    per_class = {dx: len({meta[i][0] for i in test.ids if meta[i][1] == dx}) for dx in ("akiec", "mel", "nv")}
    assert per_class == {"akiec": 1, "mel": 1, "nv": 2}
    for x, y, image_id in zip(train.images, train.labels, train.ids):
        assert train.classes[y] == meta[image_id][1]
        channel = {"akiec": 0, "mel": 1, "nv": 2}[meta[image_id][1]]
        assert int(np.argmax(x.mean(axis=(1, 2)))) == channel  # solid colour survives JPEG + resize + normalization


def test_folder_labels_csv_with_png_and_grayscale(tmp_path):
    # prepare
    from PIL import Image
    root = tmp_path / "gen"
    (root / "imgs").mkdir(parents=True)
    lines = ["filename,label"]
    for i in range(10):
        label = "cat" if i % 2 else "bird"
        Image.new("L", (5 + i, 7), 51 * (i % 5)).save(root / "imgs" / f"{i}.png")
        lines.append(f"imgs/{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    # execute
    train = D.load(f"folder:{root}", split="train", image_size=(4, 4), normalize=False)
    test = D.load(f"folder:{root}", split="test", image_size=(4, 4), normalize=False)
    # assert
    assert train.classes == ("bird", "cat")
    assert len(train) == 8 and len(test) == 2 and sorted(test.labels.tolist()) == [0, 1]
    for x, name in zip(list(train.images) + list(test.images), train.ids + test.ids):
        i = int(Path(name).stem)
        np.testing.assert_allclose(x, 51 * (i % 5) / 255.0, atol=1e-6)  # grey -> RGB, exact for PNG


@pytest.mark.parametrize(
    "layout, message",
    [
        ("none", "neither HAM10000_metadata.csv nor labels.csv"),
        ("bad-columns", "missing column\\(s\\) dx"),
        ("missing-image", "1 listed image\\(s\\) not found: ISIC_9"),
        ("escape", "points outside"),
    ],
)
def test_folder_layout_errors_describe_the_expected_layout(tmp_path, layout, message):
    root = tmp_path / "d"
    root.mkdir()
    if layout == "bad-columns":
        (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id\nx,ISIC_1\n")
    elif layout == "missing-image":
        (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nx,ISIC_9,nv\n")
    elif layout == "escape":
        (root / "labels.csv").write_text("filename,label\n../secret.png,a\n")
    with pytest.raises(D.DatasetError, match=message):
        D.load(f"folder:{root}", split="train")


@pytest.mark.parametrize("layout, message", [("none", "neither HAM10000_metadata.csv"), ("bad-columns", "missing column")])
def test_folder_layout_is_checked_before_pillow_is_needed(tmp_path, monkeypatch, layout, message):
    # prepare: a broken layout on a machine without Pillow (None in sys.modules makes the import fail)
    root = tmp_path / "d"
    root.mkdir()
    if layout == "bad-columns":
        (root / "labels.csv").write_text("file,label\nx.png,a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)
    # execute / assert: the layout is named, not Pillow
    with pytest.raises(D.DatasetError, match=message):
        D.load(f"folder:{root}", split="train")
    (root / "labels.csv").write_text("filename,label\nx.png,a\n")
    (root / "x.png").write_bytes(b"")
    with pytest.raises(D.DatasetError, match="need Pillow"):  # a good layout still says what is missing
        D.load(f"folder:{root}", split="train")


# ---------------------------------------------------------------------------
# synthetic and specs


def test_synthetic_is_deterministic_and_learnable():
    # execute
    a = D.load("synthetic:n=600,test=200,classes=6,shape=3x16x16,seed=5", split="train")
    b = D.load("synthetic:n=600,test=200,classes=6,shape=3x16x16,seed=5", split="train")
    c = D.load("synthetic:n=600,test=200,classes=6,shape=3x16x16,seed=6", split="train")
    test = D.load("synthetic:n=600,test=200,classes=6,shape=3x16x16,seed=5", split="test")
    # assert
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (600, 3, 16, 16) and test.images.shape == (200, 3, 16, 16) and a.num_classes == 6
    np.testing.assert_array_equal(np.bincount(a.labels), np.full(6, 100))
    # nearest class mean, fit on train, is far above chance (1/6) on test
    centroids = np.stack([a.images[a.labels == k].mean(axis=0).ravel() for k in range(6)])
    d2 = ((test.images.reshape(200, -1)[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (d2.argmin(1) == test.labels).mean() > 0.9


def test_synthetic_short_forms():
    assert len(D.load("synthetic:100", split="train")) == 100
    assert len(D.load("synthetic:100", split="test")) == 25
    ds = D.load("synthetic", split="train")
    assert len(ds) == 2048 and ds.input_shape == (1, 28, 28) and ds.num_classes == 10


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet:/data", "unknown data spec 'imagenet:/data'; accepted forms: fashion-mnist, fashion-mnist:DIR, mnist:DIR, idx:DIR, cifar10:DIR, folder:DIR, synthetic"),
        ("", "non-empty"),
        ("cifar10", "needs a directory"),
        ("mnist", "Debian has no MNIST package"),
        ("idx:", "empty directory"),
        ("synthetic:n=10,colour=red", "known keys: n, test, classes, shape, seed, noise"),
        ("synthetic:abc", "must be an integer"),
        ("synthetic:shape=3x32", "must be CxHxW"),
        ("synthetic:classes=1", "must be >= 2"),
    ],
)
def test_bad_specs_are_rejected_with_accepted_forms(spec, message):
    with pytest.raises(D.DatasetError, match=message.replace("(", "\\(").replace(")", "\\)")):
        D.load(spec, split="train")


@pytest.mark.parametrize("spec, key", [("synthetic:10000000000000", "n"), ("synthetic:n=8,test=100000000,shape=3x64x64", "test")])
def test_synthetic_sizes_beyond_the_limit_are_refused_before_allocating(spec, key):
    # 2 GiB / (4 * 3 * 64 * 64) = 43690 samples of 3x64x64; 2 GiB / (4 * 784) = 684784 of 1x28x28
    limit = {"n": 684784, "test": 43690}[key]
    value = spec.split(":")[1].split(",")[1 if key == "test" else 0].removeprefix("n=").removeprefix("test=")
    for split in ("train", "test"):  # the spec is refused as a whole, whichever split is loaded
        with pytest.raises(D.DatasetError) as err:
            D.load(spec, split=split)
        msg = str(err.value)
        assert f"synthetic parameter {key}={value} is too large" in msg
        assert f"over the limit of {D.SYNTHETIC_MAX_BYTES} bytes ({limit} samples of this shape)" in msg


def test_parse_spec_and_split_argument():
    assert D.parse_spec("fashion-mnist") == D.DataSpec("fashion-mnist", str(D.FASHION_MNIST_DIR))
    assert D.parse_spec("cifar10:/x/y") == D.DataSpec("cifar10", "/x/y")
    assert str(D.parse_spec("synthetic:n=8,seed=2")) == "synthetic:n=8,seed=2"
    with pytest.raises(ValueError, match="split must be one of \\('train', 'test'\\), got 'val'"):
        D.load("synthetic", split="val")


# ---------------------------------------------------------------------------
# partitions


def _labels(n: int = 3000, k: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "dirichlet:1.0", "dirichlet:100"])
def test_partition_is_disjoint_covering_and_deterministic(scheme):
    # prepare
    y = _labels()
    # execute: each client computes its own shard independently
    shards = [D.partition(y, 7, c, scheme, seed=11) for c in range(7)]
    again = [D.partition(y, 7, c, scheme, seed=11) for c in range(7)]
    other = [D.partition(y, 7, c, scheme, seed=12) for c in range(7)]
    # assert
    allidx = np.concatenate(shards)
    assert allidx.dtype == np.int64 and len(allidx) == len(y)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(y)))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))
    assert all(np.all(np.diff(s) > 0) for s in shards)
    assert min(len(s) for s in shards) >= (1 if scheme == "iid" else D.DIRICHLET_MIN_SIZE)
    if scheme == "iid":
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _mean_tv(y: np.ndarray, shards: list[np.ndarray], k: int = 10) -> float:
    glob = np.bincount(y, minlength=k) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[s], minlength=k) / len(s) - glob).sum() for s in shards]))


def test_dirichlet_is_skewed_and_iid_is_not():
    # prepare
    y = _labels(6000)
    # execute
    tv_iid = _mean_tv(y, D.partition_all(y, 10, "iid", seed=3))
    tv_01 = _mean_tv(y, D.partition_all(y, 10, "dirichlet:0.1", seed=3))
    tv_100 = _mean_tv(y, D.partition_all(y, 10, "dirichlet:100", seed=3))
    # assert: total variation distance from the global label distribution
    assert tv_iid < 0.06
    assert tv_01 > 0.5
    assert tv_100 < 0.15 < tv_01


def test_dirichlet_min_size_holds_even_when_redraws_fail():
    # prepare: 50 clients, tiny alpha, a high minimum: no plain draw satisfies it, rebalancing must
    y = _labels(2000)
    # execute
    shards = D.partition_all(y, 50, "dirichlet:0.01", seed=0, min_size=35)
    # assert
    assert min(len(s) for s in shards) >= 35
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(2000))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(20, 400),
    k=st.integers(1, 8),
    classes=st.integers(1, 6),
    alpha=st.sampled_from(["iid", "dirichlet:0.05", "dirichlet:0.5", "dirichlet:5"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(n, k, classes, alpha, seed):
    y = _labels(n, classes, seed=1)
    m = min(2, n // k)
    shards = D.partition_all(y, k, alpha, seed, min_size=m)
    assert len(shards) == k
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    assert min(map(len, shards)) >= m


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"client_id": 4}, ValueError, "client_id must lie in 0..3 for num_clients=4, got 4"),
        ({"client_id": -1}, ValueError, "client_id must be >= 0"),
        ({"num_clients": 0}, ValueError, "num_clients must be >= 1"),
        ({"scheme": "dirichlet:0"}, ValueError, "ALPHA must be finite and > 0"),
        ({"scheme": "dirichlet:-1"}, ValueError, "ALPHA must be finite and > 0"),
        ({"scheme": "dirichlet:x"}, ValueError, "ALPHA must be a number"),
        ({"scheme": "shards:2"}, ValueError, "unknown partition scheme 'shards:2'; accepted: iid, dirichlet:ALPHA"),
        ({"min_size": 200}, ValueError, "cannot give each of 4 clients at least min_size=200"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"client_id": 1.0}, TypeError, "client_id must be an int"),
    ],
)
def test_partition_validates_arguments(kwargs, exc, message):
    args = {"labels": _labels(600), "num_clients": 4, "client_id": 0, "scheme": "dirichlet:0.5", "seed": 0} | kwargs
    with pytest.raises(exc, match=message.replace("(", "\\(")):
        D.partition(**args)


# ---------------------------------------------------------------------------
# batches


@pytest.fixture(scope="module")
def small():
    return D.load("synthetic:n=203,classes=4,shape=1x4x4", split="train")


def test_batches_resume_equals_the_tail_of_the_epoch(small):
    # prepare
    idx = D.partition(small.labels, 3, 1, "iid", seed=0)
    full = list(D.batches(small, idx, 8, seed=5, epoch=2))
    # execute / assert
    for k in (0, 1, 4, len(full)):
        tail = list(D.batches(small, idx, 8, seed=5, epoch=2, start_batch=k))
        assert len(tail) == len(full) - k
        for (xa, ya), (xb, yb) in zip(tail, full[k:]):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_batches_shuffle_per_epoch_and_cover_the_shard(small):
    # prepare
    idx = D.partition(small.labels, 3, 0, "iid", seed=0)  # 68 samples
    # execute
    e0 = list(D.batches(small, idx, 8, seed=5, epoch=0, drop_last=False))
    e0b = list(D.batches(small, idx, 8, seed=5, epoch=0, drop_last=False))
    e1 = list(D.batches(small, idx, 8, seed=5, epoch=1, drop_last=False))
    dropped = list(D.batches(small, idx, 8, seed=5, epoch=0))
    # assert
    assert len(e0) == 9 and e0[-1][0].shape == (4, 1, 4, 4) and len(dropped) == 8
    assert all(x.shape == (8, 1, 4, 4) and x.dtype == np.float32 and y.dtype == np.int64 for x, y in dropped)
    seen = np.concatenate([x.reshape(len(x), -1) for x, _ in e0])
    np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(small.images[idx].reshape(len(idx), -1), axis=0))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(e0, e0b))
    assert not np.array_equal(e0[0][0], e1[0][0])
    order = D.epoch_order(idx, seed=5, epoch=0)
    np.testing.assert_array_equal(dropped[2][1], small.labels[order[16:24]])
    assert D.num_batches(68, 8) == 8 and D.num_batches(68, 8, drop_last=False) == 9


def test_batches_validate_arguments(small):
    with pytest.raises(ValueError, match="start_batch must lie in 0..25"):
        D.batches(small, None, 8, seed=0, epoch=0, start_batch=26)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        D.batches(small, None, 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="indices must lie in 0..202"):
        D.batches(small, [0, 203], 2, seed=0, epoch=0)


def test_eval_batches_are_in_fixed_order_with_a_short_last_batch(small):
    out = list(D.eval_batches(small, 50))
    assert [len(y) for _, y in out] == [50, 50, 50, 50, 3]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in out]), small.images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in out]), small.labels)


def test_dataset_arrays_are_read_only_and_batches_are_copies(small):
    x, _ = next(D.batches(small, None, 4, seed=0, epoch=0))
    x[:] = 0  # a batch is the caller's to modify
    with pytest.raises(ValueError):
        small.images[0, 0, 0, 0] = 1.0
    assert np.any(small.images != 0)


# ---------------------------------------------------------------------------
# import hygiene


def test_import_pulls_in_neither_torch_nor_onnxruntime_nor_pillow():
    code = (
        "import json, sys\n"
        "import splitedge.runtime_edge.data as d\n"
        "ds = d.load('synthetic:64', split='train')\n"
        "list(d.batches(ds, d.partition(ds.labels, 2, 0, 'dirichlet:0.5', 0, min_size=1), 8, seed=0, epoch=0))\n"
        "heavy = {'torch', 'onnxruntime', 'onnx', 'PIL', 'zmq', 'matplotlib'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_partition_fingerprint_tells_equal_plans_and_differing_shards_apart():
    y = np.random.default_rng(0).integers(0, 10, 1000)
    shards = D.partition_all(y, 4, "dirichlet:0.5", 3)
    a = D.partition_fingerprint(y, shards, "dirichlet:0.5", 3)
    assert a == D.partition_fingerprint(y.copy(), D.partition_all(y, 4, "dirichlet:0.5", 3), "dirichlet:0.5", 3)
    assert a["numpy"] == np.__version__ and len(a["plan"]) == len(a["digest"]) == 32
    # another seed or scheme is another plan; the same plan with other shards is another digest
    assert D.partition_fingerprint(y, shards, "dirichlet:0.5", 4)["plan"] != a["plan"]
    assert D.partition_fingerprint(y, shards, "iid", 3)["plan"] != a["plan"]
    moved = [shards[0][1:], np.sort(np.concatenate([shards[1], shards[0][:1]])), shards[2], shards[3]]
    b = D.partition_fingerprint(y, moved, "dirichlet:0.5", 3)
    assert b["plan"] == a["plan"] and b["digest"] != a["digest"]
