"""CIFAR-10: the binary version (fixed records, preferred) or the python version (pickles, restricted).

Binary version (``cifar-10-binary.tar.gz``, folder ``cifar-10-batches-bin/``):
``data_batch_1.bin`` .. ``data_batch_5.bin`` and ``test_batch.bin``, each a
sequence of 3073-byte records, 1 label byte (0..9) then 3072 pixel bytes (1024
red, 1024 green, 1024 blue, each 32x32 row-major); ``batches.meta.txt`` names
the classes, one per line. Nothing in it is executable: it is read with
:func:`numpy.fromfile` after its size has been checked.

Python version (``cifar-10-python.tar.gz``, folder ``cifar-10-batches-py/``):
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``,
Python 2 pickles of a dict. They are read by :func:`safe_unpickle`: the standard
:class:`pickle.Unpickler` with a ``find_class`` that knows only numpy's array
reconstruction names and hands back stand-ins, never numpy's own callables.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from .spec import NORMALIZATION, Dataset, DatasetError, UnsafePickleError, to_float

__all__ = ["CIFAR10_CLASSES", "CIFAR10_HELP", "MAX_BATCH_BYTES", "load_cifar10", "read_cifar_bin", "safe_unpickle"]

CIFAR10_HELP = (
    "Download the CIFAR-10 binary version, https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz "
    "(files data_batch_1.bin..data_batch_5.bin, test_batch.bin, batches.meta.txt), or the python version, "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (files data_batch_1..5, test_batch, "
    "batches.meta); unpack it with `tar xzf FILE`, and pass --data cifar10:DIR where DIR is the unpacked "
    "cifar-10-batches-bin/ or cifar-10-batches-py/, or the folder that contains it."
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

PIXELS = 3 * 32 * 32
RECORD_BYTES = 1 + PIXELS
MAX_BATCH_BYTES = 1 << 28
"""The largest batch file read (256 MiB; a real CIFAR-10 batch is about 30 MiB)."""
_MAX_NDIM = 32
_MAX_DEPTH = 64
# plain numeric dtypes only: never object, string, void or structured ones
_ALLOWED_DTYPES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})


# ---------------------------------------------------------------------------
# binary version


def _checked_size(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}. {CIFAR10_HELP}") from e
    if size > MAX_BATCH_BYTES:
        raise DatasetError(f"{path}: {size} bytes, over the {MAX_BATCH_BYTES}-byte limit for one CIFAR-10 batch")
    return size


def read_cifar_bin(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: (uint8 pixels (N, 3072), int64 labels (N,)); the size is checked first."""
    path = Path(path)
    size = _checked_size(path)
    if size == 0 or size % RECORD_BYTES:
        raise DatasetError(
            f"{path}: not a CIFAR-10 binary batch: {size} bytes is not a whole number of "
            f"{RECORD_BYTES}-byte records (1 label byte + {PIXELS} pixel bytes). {CIFAR10_HELP}"
        )
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from e
    if raw.size != size:
        raise DatasetError(f"{path}: changed while being read ({raw.size} of {size} bytes)")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.size and int(labels.max()) > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DatasetError(f"{path}: record {bad} has label {int(labels[bad])}; CIFAR-10 labels lie in 0..9")
    return np.ascontiguousarray(records[:, 1:]), labels


def _bin_classes(directory: Path) -> tuple[str, ...]:
    meta = directory / "batches.meta.txt"
    if not meta.is_file():
        return CIFAR10_CLASSES
    if _checked_size(meta) > 1 << 16:
        raise DatasetError(f"{meta}: too large for a list of 10 class names")
    try:
        names = [ln.strip() for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{meta}: cannot read: {e}") from e
    if len(names) != 10:
        raise DatasetError(f"{meta}: expected 10 class names, one per line, found {len(names)}")
    return tuple(names)


# ---------------------------------------------------------------------------
# python version: a restricted unpickler


class _NdarrayToken:
    """Stands in for ``numpy.ndarray``: a marker passed to ``_reconstruct``, never callable."""

    def __new__(cls, *args: object, **kwargs: object) -> _NdarrayToken:
        raise UnsafePickleError("refusing to call numpy.ndarray: only _reconstruct(numpy.ndarray, (0,), b'b') is allowed")


def _text(v: object, what: str) -> str:
    if isinstance(v, bytes):
        try:
            return v.decode("ascii")
        except UnicodeDecodeError:
            raise UnsafePickleError(f"{what} is not ASCII: {v[:40]!r}") from None
    if isinstance(v, str):
        return v
    raise UnsafePickleError(f"{what} must be a string, got {type(v).__name__}")


class _Dtype:
    """Stands in for ``numpy.dtype(typestr, False, True)`` of a plain numeric typestr, plus its byte order."""

    __slots__ = ("order", "typestr")
    typestr: str
    order: Literal["<", ">", "|", "="]

    def __new__(cls, *args: object, **kwargs: object) -> _Dtype:
        if kwargs or len(args) != 3 or args[1] not in (0, False) or args[2] not in (1, True):
            raise UnsafePickleError(f"refusing numpy.dtype{args!r:.80}: expected dtype(typestr, False, True)")
        typestr = _text(args[0], "dtype")
        if typestr not in _ALLOWED_DTYPES:
            raise UnsafePickleError(
                f"refusing numpy dtype {typestr!r}: only plain numeric "
                f"dtypes ({', '.join(sorted(_ALLOWED_DTYPES))}) are allowed"
            )
        self = object.__new__(cls)
        self.typestr, self.order = typestr, "="
        return self

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafePickleError(f"unexpected numpy dtype state {state!r:.120}")
        order = _text(state[1], "dtype byte order")
        if order not in ("<", ">", "|", "=") or state[2:5] != (None, None, None):
            raise UnsafePickleError(f"refusing numpy dtype state {state!r:.120}: only plain numeric dtypes are allowed")
        self.order = cast(Literal["<", ">", "|", "="], order)

    def numpy(self) -> np.dtype:
        dt = np.dtype(self.typestr)
        return dt.newbyteorder(self.order) if dt.itemsize > 1 and self.order in "<>" else dt


class _Call:
    """An allowed callable (a bound check of the loader); its state cannot be set."""

    __slots__ = ("fn", "name")

    def __init__(self, name: str, fn: Any) -> None:
        self.name, self.fn = name, fn

    def __call__(self, *args: object) -> object:
        return self.fn(*args)

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError(f"refusing to set the state of {self.name}")


class _PendingArray:
    """What ``_reconstruct`` returns: becomes a numpy array when BUILD gives it its state."""

    __slots__ = ("array", "loader")
    array: np.ndarray | None

    def __init__(self, loader: _Loader) -> None:
        self.loader, self.array = loader, None

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise UnsafePickleError("array state set twice")
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or state[2] not in (0, 1, False, True):
            raise UnsafePickleError(f"unexpected numpy array state {state!r:.120}")
        shape, dt, fortran, raw = state
        if not isinstance(dt, _Dtype):
            raise UnsafePickleError(f"expected a numpy dtype in the array state, got {type(dt).__name__}")
        self.array = self.loader.make_array(raw, dt.numpy(), shape, bool(fortran))


class _Loader(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are stand-ins for numpy's array reconstruction, nothing else."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.budget = len(data)  # array bytes may not exceed the file's: no amplification through the memo
        reconstruct = _Call("numpy.core.multiarray._reconstruct", self._reconstruct)
        frombuffer = _Call("numpy.core.numeric._frombuffer", self._frombuffer)
        # numpy < 2 pickles name numpy.core, numpy 2 numpy._core
        self.allowed: dict[tuple[str, str], object] = {
            **{(m, "_reconstruct"): reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
            **{(m, "_frombuffer"): frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
            ("numpy", "ndarray"): _NdarrayToken,
            ("numpy", "dtype"): _Dtype,
        }

    def find_class(self, module: str, name: str) -> object:
        g = self.allowed.get((module, name))
        if g is None:
            raise UnsafePickleError(
                f"refusing global {module}.{name}: this reader only rebuilds plain data and numpy arrays, "
                "and never imports what a file names"
            )
        return g

    def persistent_load(self, pid: object) -> object:
        raise UnsafePickleError("refusing a persistent id: only plain data and numpy arrays are allowed")

    def _reconstruct(self, *args: object) -> _PendingArray:
        if len(args) != 3 or args[0] is not _NdarrayToken or args[1] != (0,) or _text(args[2], "dtype") != "b":
            raise UnsafePickleError(
                f"refusing numpy.core.multiarray._reconstruct{args!r:.80}: "
                "only _reconstruct(numpy.ndarray, (0,), b'b') is allowed"
            )
        return _PendingArray(self)

    def _frombuffer(self, *args: object) -> np.ndarray:
        if len(args) != 4 or not isinstance(args[1], _Dtype):
            raise UnsafePickleError("refusing numpy.core.numeric._frombuffer: expected (buffer, dtype, shape, order)")
        order = _text(args[3], "_frombuffer order")
        if order not in ("C", "F"):
            raise UnsafePickleError(f"refusing numpy.core.numeric._frombuffer order {order!r}")
        return self.make_array(args[0], args[1].numpy(), args[2], order == "F")

    def make_array(self, raw: object, dtype: np.dtype, shape: object, fortran: bool) -> np.ndarray:
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError(f"array data must be raw bytes, got {type(raw).__name__}")
        if (
            not isinstance(shape, tuple)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise UnsafePickleError(f"array shape must be a tuple of non-negative ints, got {shape!r:.120}")
        need = math.prod(shape) * dtype.itemsize
        if need != len(raw):
            raise UnsafePickleError(f"array of shape {shape} {dtype} needs {need} bytes, the pickle holds {len(raw)}")
        self.budget -= need
        if self.budget < 0:
            raise UnsafePickleError("the pickle's arrays hold more bytes than the file: refusing a repeated buffer")
        arr = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return arr.astype(dtype.newbyteorder("=")) if not dtype.isnative else arr


_NAMES = {_NdarrayToken: "numpy.ndarray", _Dtype: "numpy.dtype"}
_SCALARS = (str, bytes, int, float, bool, type(None))


def _resolve(obj: object, depth: int = 0) -> object:
    """Replaces stand-ins by numpy objects and checks every value is plain data (bounded depth)."""
    if depth > _MAX_DEPTH:
        raise UnsafePickleError(f"pickle nests containers more than {_MAX_DEPTH} deep")
    if isinstance(obj, (*_SCALARS, np.ndarray)):
        return obj
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise UnsafePickleError("numpy array without state")
        return obj.array
    if isinstance(obj, _Dtype):
        return obj.numpy()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, _SCALARS + (tuple,)):
                raise UnsafePickleError(f"refusing a dict key of type {type(k).__name__}")
            out[_resolve(k, depth + 1)] = _resolve(v, depth + 1)
        return out
    if isinstance(obj, list):
        return [_resolve(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, depth + 1) for v in obj)
    if isinstance(obj, _Call):
        raise UnsafePickleError(f"pickle returns the global {obj.name} itself")
    if isinstance(obj, type) and obj in _NAMES:
        raise UnsafePickleError(f"pickle returns the global {_NAMES[obj]} itself")
    raise UnsafePickleError(f"refusing a {type(obj).__name__}: only plain data and numpy arrays are allowed")


def _scan(data: bytes) -> tuple[int, Exception] | None:
    """Walks the opcodes (:func:`pickletools.genops` decodes, it executes nothing) before loading.

    Memo indices must come in sequence, as every pickler writes them: the C unpickler sizes its memo
    table by the largest index it is given, so a 9-byte pickle could otherwise make it allocate and
    clear 64 GiB. Returns None, or (offset, error) when the opcodes stop decoding at ``offset``:
    only the part before it is handed to the unpickler, so that the first problem in the stream
    (e.g. a refused global) is the one reported.
    """
    f = io.BytesIO(data)
    puts = good_end = 0
    try:
        for op, arg, pos in pickletools.genops(f):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not isinstance(arg, int) or not 0 <= arg <= puts + 1:
                    raise UnsafePickleError(
                        f"refusing memo index {arg} at offset {pos}: after {puts} memo entries the next index "
                        f"is at most {puts + 1}"
                    )
                puts += 1
            elif op.name == "MEMOIZE":
                puts += 1
            good_end = f.tell()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or hostile file, reported after the unpickler's view
        return good_end, e
    return None


def safe_unpickle(data: bytes) -> object:
    """Loads a pickle of plain data and numpy arrays of plain numeric dtypes, importing nothing it names.

    :class:`pickle.Unpickler` (``encoding="bytes"``, as CIFAR-10's Python 2
    pickles need) with a ``find_class`` allow-list of exactly numpy's array
    reconstruction names: ``numpy.core.multiarray._reconstruct`` and
    ``numpy.core.numeric._frombuffer`` (and their ``numpy._core`` spellings),
    ``numpy.ndarray`` and ``numpy.dtype``. Each resolves to a stand-in that
    checks its arguments: ``_reconstruct(numpy.ndarray, (0,), b'b')`` plus the
    state ``(1, shape, dtype, is_fortran, raw_bytes)``; ``dtype(typestr, False,
    True)`` for numeric typestrs plus a state without fields; the array is made
    by :func:`numpy.frombuffer` after its byte count is checked, and all arrays
    together may not hold more bytes than the pickle. Memo indices are checked
    to come in sequence before loading starts (:func:`_scan`). Then the result is
    walked: only ``dict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``,
    ``float``, ``bool``, ``None`` and those arrays pass. Anything else, or a
    malformed pickle, raises :class:`UnsafePickleError` naming it.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if len(data) > MAX_BATCH_BYTES:
        raise UnsafePickleError(f"pickle of {len(data)} bytes exceeds the {MAX_BATCH_BYTES}-byte limit")
    bad = _scan(data)
    try:
        obj = _Loader(data if bad is None else data[: bad[0]]).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a hostile or damaged file is reported as such
        raise _malformed(bad[1] if bad is not None else e) from None
    if bad is not None:  # cannot happen (the part before a decoding error holds no STOP), but never load past it
        raise _malformed(bad[1])
    return _resolve(obj)


def _malformed(e: Exception) -> UnsafePickleError:
    return UnsafePickleError(f"malformed pickle: {type(e).__name__}: {str(e)[:200]}")


def _field(d: Mapping[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(
        f"{path}: not a CIFAR-10 batch: no {key!r} entry "
        f"(keys: {sorted(map(repr, d))[:8]}). {CIFAR10_HELP}"
    )


def _unpickle_file(path: Path) -> object:
    _checked_size(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e}. {CIFAR10_HELP}") from e
    try:
        return safe_unpickle(blob)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None


def read_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch: (uint8 pixels (N, 3072), int64 labels (N,)), dtype and shape checked."""
    d = _unpickle_file(path)
    if not isinstance(d, dict):
        raise DatasetError(
            f"{path}: not a CIFAR-10 batch: the pickle holds "
            f"a {type(d).__name__}, not a dict. {CIFAR10_HELP}"
        )
    data, labels = _field(d, "data", path), _field(d, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: CIFAR-10 'data' must be uint8 (N, {PIXELS}), got {desc}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise DatasetError(f"{path}: CIFAR-10 'labels' must be a list of ints")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DatasetError(f"{path}: CIFAR-10 labels must lie in 0..9, got {int(y.min())}..{int(y.max())}")
    return data, y


def _py_classes(directory: Path) -> tuple[str, ...]:
    meta = directory / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    d = _unpickle_file(meta)
    names = _field(d, "label_names", meta) if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{meta}: 'label_names' must be a list of 10 names")
    return tuple(_text(v, "label name") for v in names)


# ---------------------------------------------------------------------------
# the dataset

_BIN, _PY = "cifar-10-batches-bin", "cifar-10-batches-py"


def _layout(path: Path) -> tuple[Path, bool]:
    """(the batch folder, binary?): a batches-bin/ or batches-py/ folder inside ``path``, else ``path`` itself."""
    for sub, binary in ((_BIN, True), (_PY, False)):
        if (path / sub).is_dir():
            return path / sub, binary
    binary = any((path / f"{nm}.bin").is_file() for nm in ("test_batch", "data_batch_1"))
    return path, binary


def load_cifar10(path: Path, split: str, normalize: bool) -> Dataset:
    if not path.is_dir():
        raise DatasetError(f"cifar10: directory {path} not found. {CIFAR10_HELP}")
    directory, binary = _layout(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if binary:
        names = [nm + ".bin" for nm in names]
    missing = [nm for nm in names if not (directory / nm).is_file()]
    if missing:
        raise DatasetError(f"cifar10: {directory} has no {', '.join(missing)}. {CIFAR10_HELP}")
    read = read_cifar_bin if binary else read_cifar_py
    parts = [read(directory / nm) for nm in names]
    classes = _bin_classes(directory) if binary else _py_classes(directory)
    raw = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts])
    del parts
    # each row: 1024 red, 1024 green, 1024 blue, each 32x32 row-major -> (N, 3, 32, 32) as is
    x, norm = to_float(raw.reshape(-1, 3, 32, 32), NORMALIZATION["cifar10"] if normalize else None)
    return Dataset("cifar10", split, x, y, classes, norm)
