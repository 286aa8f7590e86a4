"""IDX files (MNIST's format) and the MNIST / Fashion-MNIST / generic ``idx:`` datasets.

IDX layout: two zero bytes, a type code, the rank, ``rank`` big-endian uint32
dimensions, then the big-endian data. Files may be gzipped (``.gz``).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .spec import Dataset, DatasetError, Normalization, to_float

__all__ = ["FASHION_MNIST_CLASSES", "IDX_HELP", "MNIST_CLASSES", "load_idx_dataset", "read_idx"]

IDX_HELP = (
    "idx:DIR needs MNIST's four file names in DIR, each plain or .gz: train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte."
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(i) for i in range(10))

# type code -> numpy dtype (IDX data is big-endian)
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_MAX_RANK = 8
_DEFLATE_MAX_RATIO = 1100


def _read_exact(f: Any, n: int, path: Path, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise DatasetError(f"{path}: truncated IDX file: ended inside the {what} ({len(b)} of {n} bytes)")
    return b


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file (plain, or gzipped when the name ends in ``.gz``).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the rank, then ``rank`` big-endian
    uint32 dimensions, then the big-endian data, nothing after it. The data
    length is checked against the file (plain), or the gzip trailer's size
    field and deflate's maximum ratio (gzip), before anything is allocated. Returns a native-endian array.
    """
    path = Path(path)
    gz = path.name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = _read_exact(f, 4, path, "header")
            if head[0] != 0 or head[1] != 0:
                raise DatasetError(
                    f"{path}: not an IDX file: magic bytes {head.hex()}, "
                    "expected 0000 then a type code and a rank"
                )
            code, rank = head[2], head[3]
            if code not in _IDX_DTYPES:
                known = ", ".join(f"0x{k:02X}" for k in _IDX_DTYPES)
                raise DatasetError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
            if not 1 <= rank <= _IDX_MAX_RANK:
                raise DatasetError(f"{path}: IDX rank {rank} out of range 1..{_IDX_MAX_RANK}")
            dims = struct.unpack(f">{rank}I", _read_exact(f, 4 * rank, path, "dimensions"))
            dtype = np.dtype(_IDX_DTYPES[code])
            nbytes = math.prod(dims) * dtype.itemsize
            total = 4 + 4 * rank + nbytes
            shape_s = "x".join(map(str, dims))
            if gz:
                isize = _gzip_isize(path)
                packed = os.path.getsize(path)
                if total > _DEFLATE_MAX_RATIO * packed:  # deflate cannot expand more than ~1032x
                    raise DatasetError(
                        f"{path}: corrupt: the IDX header says {shape_s} {dtype.name} ({total} bytes), "
                        f"more than a {packed}-byte gzip file can hold"
                    )
                if isize != total % 2**32:
                    raise DatasetError(
                        f"{path}: truncated or corrupt: the IDX header says {shape_s} {dtype.name} "
                        f"({total} bytes uncompressed), the gzip trailer says {isize} bytes"
                    )
            else:
                size = os.fstat(f.fileno()).st_size
                if size != total:
                    kind = "truncated" if size < total else "has trailing bytes"
                    raise DatasetError(
                        f"{path}: {kind}: the IDX header says {shape_s} {dtype.name} "
                        f"({total} bytes in all), the file has {size} bytes"
                    )
            buf = np.empty(nbytes, dtype=np.uint8)
            view, got = buf.data, 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise DatasetError(
                        f"{path}: truncated IDX file: {got} of "
                        f"{nbytes} data bytes ({shape_s} {dtype.name})"
                    )
                got += n
            if f.read(1):
                raise DatasetError(f"{path}: trailing bytes after the {shape_s} {dtype.name} IDX data")
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no such file") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX file: {e}") from e
    arr = buf.view(dtype).reshape(dims)
    if not dtype.isnative and dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def _gzip_isize(path: Path) -> int:
    """The gzip trailer's ISIZE: the uncompressed length mod 2**32 (of the last member)."""
    with open(path, "rb") as raw:
        raw.seek(0, os.SEEK_END)
        if raw.tell() < 18:
            raise DatasetError(f"{path}: truncated gzip file ({raw.tell()} bytes)")
        raw.seek(-4, os.SEEK_END)
        return int(struct.unpack("<I", raw.read(4))[0])


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    # also the dotted variant some mirrors use: train-images.idx3-ubyte
    dotted = stem.replace("-idx", ".idx", 1)
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def load_idx_dataset(
    directory: Path,
    split: str,
    name: str,
    classes: tuple[str, ...] | None,
    norm: Normalization | None,
    help_text: str,
) -> Dataset:
    if not directory.is_dir():
        raise DatasetError(f"{name}: directory {directory} not found. {help_text}")
    img_stem, lab_stem = _IDX_FILES[split]
    paths = {stem: _find_idx(directory, stem) for stem in (img_stem, lab_stem)}
    missing = [s for s, p in paths.items() if p is None]
    if missing:
        raise DatasetError(f"{name}: {directory} has no {' or '.join(m + '[.gz]' for m in missing)}. {help_text}")
    img_path, lab_path = paths[img_stem], paths[lab_stem]
    assert img_path is not None and lab_path is not None
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"{img_path}: expected uint8 images of rank 3 (N, "
            f"H, W), got {images.dtype} of rank {images.ndim}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{lab_path}: expected uint8 labels of rank 1 "
            f"(N,), got {labels.dtype} of rank {labels.ndim}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{name}: {img_path.name} has {images.shape[0]} images "
            f"but {lab_path.name} has {labels.shape[0]} labels"
        )
    if classes is None:  # generic IDX: the class count comes from the train labels, so both splits agree
        train_lab = lab_path if split == "train" else _find_idx(directory, _IDX_FILES["train"][1])
        ref = labels if train_lab is None or train_lab == lab_path else read_idx(train_lab)
        k = max(int(ref.max()) if ref.size else 0, int(labels.max()) if labels.size else 0) + 1
        classes = tuple(str(i) for i in range(k))
    elif labels.size and int(labels.max()) >= len(classes):
        raise DatasetError(f"{lab_path}: label {int(labels.max())} out of range for {name}'s {len(classes)} classes")
    x, norm = to_float(images[:, None], norm)
    del images
    return Dataset(name, split, x, labels.astype(np.int64), tuple(classes), norm)
