"""Dense bit packing of 1..8-bit codes (and wider integers as byte planes), numpy only.

Layout of :func:`pack` for a width ``b`` in 1..8: code ``i`` occupies bits
``[b*i, b*i + b)`` of the little-endian bit stream (bit 0 = least significant bit
of byte 0).  ``count`` codes take exactly ``ceil(count * b / 8)`` bytes; unused
high bits of the last byte are zero.

How: codes start one per byte.  Each step views the array as lanes twice as wide
and merges the two halves of every lane with shift-and-or: ``lo | hi << w``
(``w`` = bits per half).  While the merged value still fits a byte (``2w <= 8``)
a truncating cast back to ``uint8`` halves the data at once ("narrow" step, 3
numpy operations); otherwise the lane type widens (16, 32, then 64 bits; "wide"
step, 4 operations).  When a lane holds a whole number of bytes of bits the data
is dense: for 1, 2, 4 and 8 bits directly; for the other widths after taking the
low ``b`` bytes of every group of eight codes.  :func:`unpack` runs the steps
backwards.  Work proceeds in cache-sized blocks.  ``np.packbits``/``np.unpackbits``
are 10-35x slower and are not used.

:func:`pack_wide` packs unsigned integers of 0..32 bits (index streams) as
``b // 8`` whole byte planes (least significant byte first, ``count`` bytes each)
followed by one :func:`pack` stream of the remaining ``b % 8`` bits, so it too
takes exactly ``ceil(count * b / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

#: codes per block (a multiple of 8): 256 Ki codes keep every temporary in L2/L3
BLOCK = 1 << 18

_UTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _lanes(pattern: int, lane_bits: int, width: int) -> int:
    v = 0
    for i in range(width // lane_bits):
        v |= pattern << (i * lane_bits)
    return v


def _plan(b: int):
    """Steps (kind, L, w) for width b, and the final (lane bits, bytes kept per lane)."""
    steps = []
    L, w = 8, b
    while w % 8:
        if 2 * w <= L:
            steps.append(("narrow", L, w))
        else:
            steps.append(("wide", L, w))
            L *= 2
        w *= 2
    return steps, L, w // 8


_PLANS = {b: _plan(b) for b in range(1, 9)}


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits (dense)."""
    return (int(count) * int(bits) + 7) // 8


def _check_bits(bits, hi: int = 8, lo: int = 1) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= int(bits) <= hi:
        raise ValueError(f"bits must be an integer in {lo}..{hi}, got {bits!r}")
    return int(bits)


def _pack_block(c: np.ndarray, b: int, out: np.ndarray) -> None:
    """``c``: uint8 codes (< 2**b, length a multiple of 8); writes the packed bytes into ``out``."""
    steps, L, keep = _PLANS[b]
    v = c
    for kind, Lk, w in steps:
        if kind == "narrow":
            u = v.view(_UTYPES[2 * Lk])
            t = u >> (Lk - w)
            t |= u
            v = t.astype(np.uint8)
        else:
            T = _UTYPES[2 * Lk]
            u = v.view(T)
            lo = T(_lanes((1 << w) - 1, 2 * Lk, 2 * Lk))
            t = u >> T(Lk - w)
            t &= T(_lanes(((1 << w) - 1) << w, 2 * Lk, 2 * Lk))
            t |= u & lo
            v = t
    if keep * 8 != L:
        # one 1-D strided copy per kept byte: far cheaper than a 2-D slice copy with 3..7-byte rows
        src = v.view(np.uint8).reshape(-1, L // 8)
        dst = out.reshape(-1, keep)
        for j in range(keep):
            dst[:, j] = src[:, j]
    else:
        out[:] = v.view(np.uint8)


def _unpack_block(p: np.ndarray, b: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_block`: ``p`` packed bytes of ``n`` codes (``n`` a multiple of 8)."""
    steps, L, keep = _PLANS[b]
    if keep * 8 != L:
        wide = np.zeros((n * b // 8 // keep, L // 8), np.uint8)
        src = p.reshape(-1, keep)
        for j in range(keep):
            wide[:, j] = src[:, j]
        v = wide.view(_UTYPES[L]).reshape(-1)
    else:
        v = p.view(_UTYPES[L]) if L > 8 else p
    for kind, Lk, w in reversed(steps):
        T = _UTYPES[2 * Lk]
        mlo = T(_lanes((1 << w) - 1, 2 * Lk, 2 * Lk))
        mhi = T(_lanes(((1 << w) - 1) << Lk, 2 * Lk, 2 * Lk))
        u = v.astype(T) if kind == "narrow" else v
        t = u << T(Lk - w)
        t &= mhi
        u = u & mlo
        u |= t
        v = u.view(_UTYPES[Lk])
    return v.view(np.uint8)


def pack_into(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Packs ``codes`` (uint8, 1-D, each < 2**bits, length a multiple of 8) into ``out`` (n*bits/8 bytes).

    The building block for codecs that fuse packing with quantization block by block.
    """
    if bits == 8:
        np.copyto(out, codes)
        return
    n = codes.size
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        _pack_block(codes[s:e], bits, out[s * bits // 8 : e * bits // 8])


def unpack_into(buf: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Inverse of :func:`pack_into`: ``buf`` uint8 of n*bits/8 bytes, ``out`` uint8 of n codes (a multiple of 8)."""
    if bits == 8:
        np.copyto(out, buf)
        return
    n = out.size
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        out[s:e] = _unpack_block(buf[s * bits // 8 : e * bits // 8], bits, e - s)


def pack(codes: np.ndarray, bits: int, *, check: bool = True) -> np.ndarray:
    """Packs unsigned codes (< 2**bits each) densely; returns a uint8 array of ``ceil(n*bits/8)`` bytes.

    ``check=False`` skips the range check (for callers that produce the codes themselves).
    """
    b = _check_bits(bits)
    c = np.ascontiguousarray(codes).reshape(-1)
    if check and c.size:
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= (1 << b):
            raise ValueError(f"codes out of range for {b} bits: min {lo}, max {hi}")
    if c.dtype != np.uint8:
        c = c.astype(np.uint8)
    n = c.size
    out = np.empty(packed_size(n, b), np.uint8)
    n8 = n - n % 8
    if n8:
        pack_into(c[:n8], b, out[: n8 * b // 8])
    if n8 != n:
        tail = np.zeros(8, np.uint8)
        tail[: n - n8] = c[n8:]
        packed = np.empty(b, np.uint8)
        _pack_block(tail, b, packed)
        out[n8 * b // 8 :] = packed[: out.size - n8 * b // 8]
    return out


def _as_u8(buf) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, np.uint8)


def unpack(buf, bits: int, count: int) -> np.ndarray:
    """Unpacks ``count`` codes of ``bits`` bits from ``buf`` (bytes-like, exactly ``ceil(count*bits/8)`` bytes)."""
    b = _check_bits(bits)
    count = int(count)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    a = _as_u8(buf)
    need = packed_size(count, b)
    if a.size != need:
        raise ValueError(f"{count} codes of {b} bits need {need} bytes, got {a.size}")
    out = np.empty(count, np.uint8)
    n8 = count - count % 8
    if n8:
        unpack_into(a[: n8 * b // 8], b, out[:n8])
    if n8 != count:
        tail = np.zeros(b, np.uint8)
        rest = a[n8 * b // 8 :]
        tail[: rest.size] = rest
        out[n8:] = _unpack_block(tail, b, 8)[: count - n8]
    return out


def index_bits(n: int) -> int:
    """Bits needed to write any index in ``range(n)``: ``ceil(log2 n)`` (0 for n <= 1)."""
    n = int(n)
    return 0 if n <= 1 else (n - 1).bit_length()


def pack_wide(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned integers of 0..32 bits: ``bits // 8`` byte planes, then a ``bits % 8``-bit stream."""
    b = _check_bits(bits, hi=32, lo=0)
    v = np.ascontiguousarray(values).reshape(-1)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= (1 << b)):
        raise ValueError(f"values out of range for {b} bits")
    v = v.astype(np.uint32, copy=False)
    full, rem = divmod(b, 8)
    parts = [(v >> np.uint32(8 * p)).astype(np.uint8) for p in range(full)]
    if rem:
        parts.append(pack((v >> np.uint32(8 * full)).astype(np.uint8), rem, check=False))
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)


def unpack_wide(buf, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_wide`; returns uint32 values."""
    b = _check_bits(bits, hi=32, lo=0)
    count = int(count)
    a = _as_u8(buf)
    need = packed_size(count, b)
    if a.size != need:
        raise ValueError(f"{count} values of {b} bits need {need} bytes, got {a.size}")
    out = np.zeros(count, np.uint32)
    full, rem = divmod(b, 8)
    for p in range(full):
        out |= a[p * count : (p + 1) * count].astype(np.uint32) << np.uint32(8 * p)
    if rem:
        out |= unpack(a[full * count :], rem, count).astype(np.uint32) << np.uint32(8 * full)
    return out
