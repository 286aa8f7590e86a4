"""Linear (min-max) quantization shared by uq, slacc, splitfc, powerquant and easyquant.

    q     = round((x - lo) / (hi - lo) * (2^b - 1)),  half away from zero (q >= 0: floor(t + 0.5))
    x_hat = lo + q * (hi - lo) / (2^b - 1)
    |x - x_hat| <= (hi - lo) / (2 (2^b - 1))  (+ float32 rounding)   for lo <= x <= hi

Computed in float32, block by block (~1 MB) so every temporary stays in cache, with the
truncating float->uint8 cast doing the rounding of ``t + 0.5``.  When ``max(|lo|, |hi|) *
scale`` is small (no cancellation) the affine form ``x * scale + (0.5 - lo * scale)`` (2
operations) is used, else ``(x - lo) * scale + 0.5`` (3 operations); both keep every
code in ``[0, 2^b - 1]``.  ``hi == lo`` gives all-zero codes and exact reconstruction.
"""

from __future__ import annotations

import numpy as np

from . import bitpack

BLOCK = 1 << 18  # elements per block (1 MiB of float32)


def scale_of(lo: float, hi: float, bits: int) -> np.float32:
    """Codes per unit: (2^b - 1) / (hi - lo), 0 for a constant tensor (computed in float64)."""
    r = float(hi) - float(lo)
    return np.float32(((1 << bits) - 1) / r) if r > 0 else np.float32(0.0)


def step_of(lo: float, hi: float, bits: int) -> np.float32:
    """Value per code: (hi - lo) / (2^b - 1) (computed in float64)."""
    return np.float32((float(hi) - float(lo)) / ((1 << bits) - 1))


def error_bound(lo: float, hi: float, bits: int) -> float:
    """Max |x - x_hat| for values in [lo, hi]: half a step plus float32 rounding."""
    step = (float(hi) - float(lo)) / ((1 << bits) - 1)
    mag = max(abs(float(lo)), abs(float(hi)))
    return 0.5 * step * (1 + 1e-5) + 8 * 2.0**-24 * mag


def _affine(lo, scale) -> tuple[bool, np.float32]:
    """(use the 2-operation form?, its offset)."""
    lo = np.asarray(lo, np.float64)
    scale = np.asarray(scale, np.float64)
    ok = bool(np.all(np.abs(lo) * scale < 4096.0))
    return ok, (0.5 - lo * scale).astype(np.float32)


def codes_into(x: np.ndarray, lo, scale, out: np.ndarray, tmp: np.ndarray | None = None) -> None:
    """uint8 codes of ``x`` into ``out`` (same shape); ``lo``/``scale`` scalars or broadcastable arrays."""
    if tmp is None:
        tmp = np.empty(x.shape, np.float32)
    lo32 = np.asarray(lo, np.float32)
    sc32 = np.asarray(scale, np.float32)
    ok, off = _affine(lo, scale)
    if ok:
        np.multiply(x, sc32, out=tmp)
        np.add(tmp, off, out=tmp)
    else:
        np.subtract(x, lo32, out=tmp)
        np.multiply(tmp, sc32, out=tmp)
        np.add(tmp, np.float32(0.5), out=tmp)
    np.copyto(out, tmp, casting="unsafe")


def quantize_pack(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Quantizes a flat float32 array with one (lo, hi) and packs the codes: ``ceil(n*bits/8)`` bytes."""
    x = x.reshape(-1)
    n = x.size
    scale = scale_of(lo, hi, bits)
    out = np.empty(bitpack.packed_size(n, bits), np.uint8)
    lo32 = np.float32(lo)
    ok, off = _affine(lo32, scale)
    m = min(n, BLOCK)
    tmp = np.empty(m, np.float32)
    cb = np.empty(m + 8, np.uint8)
    n8 = n - n % 8
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        t = tmp[: e - s]
        if ok:
            np.multiply(x[s:e], scale, out=t)
            np.add(t, off, out=t)
        else:
            np.subtract(x[s:e], lo32, out=t)
            np.multiply(t, scale, out=t)
            np.add(t, np.float32(0.5), out=t)
        c = cb[: e - s]
        np.copyto(c, t, casting="unsafe")
        if e <= n8:
            bitpack.pack_into(c, bits, out[s * bits // 8 : e * bits // 8])
        else:  # last block with a tail that is not a multiple of 8
            out[s * bits // 8 :] = bitpack.pack(c, bits, check=False)
    return out


def dequantize(packed, bits: int, count: int, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_pack`: a flat float32 array of ``count`` values."""
    a = np.frombuffer(packed, np.uint8) if not isinstance(packed, np.ndarray) else packed
    if out is None:
        out = np.empty(count, np.float32)
    step = step_of(lo, hi, bits)
    lo32 = np.float32(lo)
    n8 = count - count % 8
    cb = np.empty(min(count, BLOCK), np.uint8)
    for s in range(0, count, BLOCK):
        e = min(count, s + BLOCK)
        if e <= n8:
            c = cb[: e - s]
            bitpack.unpack_into(a[s * bits // 8 : e * bits // 8], bits, c)
        else:
            c = bitpack.unpack(a[s * bits // 8 :], bits, e - s)
        o = out[s:e]
        np.multiply(c, step, out=o)
        np.add(o, lo32, out=o)
    return out


def dequantize_codes(codes: np.ndarray, lo, step, out: np.ndarray) -> None:
    """``out = lo + codes * step`` with broadcasting (per-channel parameters)."""
    np.multiply(codes, np.asarray(step, np.float32), out=out)
    np.add(out, np.asarray(lo, np.float32), out=out)


def minmax(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """(min, max) of an array, as float32; NaN propagates into both."""
    return np.float32(x.min()), np.float32(x.max())
