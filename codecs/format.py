"""The wire format of every codec payload: a fixed header, a parameter block, sections, CRC32.

Byte layout (all integers little-endian; format version 1)::

    offset  size  type      field
    0       4     4s        magic  b"SPEC"  (SPlitEdge Codec)
    4       1     u8        format version (this layout) = 1
    5       1     u8        codec id       (explicit per codec, see registry; never list order)
    6       1     u8        codec version  (the codec's own payload version)
    7       1     u8        dtype code     (1 = float32: the dtype decode returns)
    8       1     u8        rank r         (2..4)
    9       1     u8        S = number of sections (fixed per codec version)
    10      2     u16       P = length of the parameter block in bytes
    12      16    4 x u32   shape (dims beyond the rank are 0; every used dim >= 1)
    28      4     u32       L = total payload length in bytes, CRC included
    32      P     bytes     parameter block (codec-specific fixed struct, see each codec)
    32+P    4*S   S x u32   length of each section in bytes
    ...     ...   bytes     the sections, back to back, in order
    L-4     4     u32       CRC32 (zlib) of bytes [0, L-4)

So the fixed overhead of a payload is ``HEADER_BYTES + P + 4*S + CRC_BYTES`` =
``36 + P + 4*S`` bytes; :func:`overhead` computes it.  Sections carry raw arrays
(``float32``/``uint16``/``uint8`` little-endian) and bit-packed codes
(:mod:`splitedge.codecs.bitpack`); nothing is ever pickled or evaluated.

Decoding checks, in this order, and raises :class:`PayloadError` (a ``ValueError``)
naming the problem: size over the limit, truncated header, bad magic, unsupported
format version, declared length vs actual (truncated / trailing bytes), CRC mismatch,
unknown codec id, unsupported codec version, dtype, rank, impossible shape (a zero or
unused dimension, or a decoded size over the limit, checked before anything is
allocated), parameter-block length, section table.  Codec decoders then check every
section length against what the shape and parameters imply, and every value that
indexes something.

The size limit is :data:`DEFAULT_MAX_BYTES` (module-level, may be changed by the
application) or the ``max_bytes=`` argument of ``decode``; it bounds both the
payload length and the byte size of the decoded float32 array.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from . import registry as _registry

MAGIC = b"SPEC"
FORMAT_VERSION = 1
HEADER_BYTES = 32
CRC_BYTES = 4
MAX_RANK = 4
MIN_RANK = 2

#: Default limit, in bytes, on a payload and on the array it decodes to (1 GiB).
DEFAULT_MAX_BYTES = 1 << 30

#: dtype codes of the header (the dtype of the decoded array)
DTYPE_CODES = {1: np.dtype("<f4")}

#: Explicit codec ids (part of the wire format): each codec states its own with
#: ``@register(name, wire_id=...)`` (:mod:`splitedge.codecs.registry`); these are read-only views.
CODEC_IDS = _registry.CODEC_IDS
CODEC_NAMES = _registry.CODEC_NAMES

_HEADER = struct.Struct("<4sBBBBBBH4II")
assert _HEADER.size == HEADER_BYTES


class PayloadError(ValueError):
    """A payload is malformed: truncated, corrupted, of an unknown codec or version, or too big."""


@dataclass(frozen=True)
class Header:
    format_version: int
    codec_id: int
    codec_version: int
    dtype: np.dtype
    shape: tuple[int, ...]
    params: bytes
    sections: tuple[memoryview, ...]

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES[self.codec_id]


def overhead(params_len: int, n_sections: int) -> int:
    """Fixed bytes of a payload beyond its sections: header, parameter block, section table, CRC."""
    return HEADER_BYTES + params_len + 4 * n_sections + CRC_BYTES


def build(
    codec_id: int,
    codec_version: int,
    shape: Sequence[int],
    params: bytes,
    sections: Sequence[bytes | bytearray | memoryview | np.ndarray],
) -> bytes:
    """Assembles one payload; sections are any C-contiguous buffers (numpy arrays included)."""
    rank = len(shape)
    if not MIN_RANK <= rank <= MAX_RANK:
        raise ValueError(f"rank must be {MIN_RANK}..{MAX_RANK}, got {rank}")
    bufs = []
    for s in sections:
        if isinstance(s, np.ndarray):
            s = np.ascontiguousarray(s)
            s = memoryview(cast(Any, s)).cast("B") if s.size else b""  # ndarray is a buffer
        bufs.append(s)
    lens = [memoryview(b).nbytes for b in bufs]
    total = overhead(len(params), len(bufs)) + sum(lens)
    if total > 0xFFFFFFFF:
        raise ValueError(f"payload of {total} bytes does not fit the format's 32-bit length field")
    dims = list(shape) + [0] * (MAX_RANK - rank)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, codec_version, 1, rank, len(bufs), len(params), *dims, total)
    table = struct.pack(f"<{len(bufs)}I", *lens)
    crc = zlib.crc32(head)
    crc = zlib.crc32(params, crc)
    crc = zlib.crc32(table, crc)
    for b in bufs:
        crc = zlib.crc32(b, crc)
    return b"".join([head, params, table, *bufs, struct.pack("<I", crc & 0xFFFFFFFF)])


def parse(blob: bytes | bytearray | memoryview, max_bytes: int | None = None) -> Header:
    """Validates the envelope of a payload and returns its header and section views (no copies)."""
    limit = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    try:
        mv = memoryview(blob).cast("B")
    except TypeError as e:
        raise PayloadError(f"payload must be bytes-like, got {type(blob).__name__}") from e
    n = mv.nbytes
    if n > limit:
        raise PayloadError(f"payload of {n} bytes is over the size limit of {limit} bytes")
    if n < HEADER_BYTES + CRC_BYTES:
        raise PayloadError(f"truncated payload: {n} bytes, shorter than the {HEADER_BYTES + CRC_BYTES}-byte minimum")
    magic, fver, cid, cver, dcode, rank, nsec, plen, d0, d1, d2, d3, total = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a splitedge codec payload (expected {MAGIC!r})")
    if fver != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {fver} (this build reads version {FORMAT_VERSION})")
    if total > n:
        raise PayloadError(f"truncated payload: header says {total} bytes, got {n}")
    if total < n:
        raise PayloadError(f"payload has {n - total} trailing bytes after the declared length {total}")
    (crc,) = struct.unpack_from("<I", mv, n - CRC_BYTES)
    if zlib.crc32(mv[: n - CRC_BYTES]) & 0xFFFFFFFF != crc:
        raise PayloadError("CRC mismatch: the payload is corrupted")
    if cid not in CODEC_NAMES:
        raise PayloadError(f"unknown codec id {cid} (known: {sorted(CODEC_NAMES)})")
    if dcode not in DTYPE_CODES:
        raise PayloadError(f"unknown dtype code {dcode} (known: {sorted(DTYPE_CODES)})")
    if not MIN_RANK <= rank <= MAX_RANK:
        raise PayloadError(f"impossible rank {rank} (must be {MIN_RANK}..{MAX_RANK})")
    dims = (d0, d1, d2, d3)
    shape = tuple(dims[:rank])
    if any(d < 1 for d in shape) or any(d != 0 for d in dims[rank:]):
        raise PayloadError(f"impossible shape {dims} for rank {rank}")
    itemsize = DTYPE_CODES[dcode].itemsize
    size = itemsize
    for d in shape:
        size *= d
    if size > limit:
        raise PayloadError(f"shape {shape} decodes to {size} bytes, over the size limit of {limit} bytes")
    off = HEADER_BYTES
    if off + plen + 4 * nsec + CRC_BYTES > n:
        raise PayloadError(f"truncated payload: parameter block ({plen} B) and section table ({nsec} sections) overrun it")
    params = bytes(mv[off : off + plen])
    off += plen
    lens = struct.unpack_from(f"<{nsec}I", mv, off)
    off += 4 * nsec
    if off + sum(lens) + CRC_BYTES != n:
        raise PayloadError(
            f"section lengths {list(lens)} sum to {sum(lens)} bytes, payload has {n - off - CRC_BYTES} for them"
        )
    secs = []
    for ln in lens:
        secs.append(mv[off : off + ln])
        off += ln
    return Header(fver, cid, cver, DTYPE_CODES[dcode], shape, params, tuple(secs))
