"""Linear quantization shared by uq, slacc, splitfc, powerquant and easyquant.

The min-max grid (codec versions 1, ``grid="minmax"``):

    q     = round((x - lo) / (hi - lo) * (2^b - 1)),  half away from zero (q >= 0: floor(t + 0.5))
    x_hat = lo + q * (hi - lo) / (2^b - 1)
    |x - x_hat| <= (hi - lo) / (2 (2^b - 1))  (+ float32 rounding)   for lo <= x <= hi

Computed in float32, block by block (~1 MB) so every temporary stays in cache, with the
truncating float->uint8 cast doing the rounding of ``t + 0.5``.  When ``max(|lo|, |hi|) *
scale`` is small (no cancellation) the affine form ``x * scale + (0.5 - lo * scale)`` (2
operations) is used, else ``(x - lo) * scale + 0.5`` (3 operations); both keep every
code in ``[0, 2^b - 1]``.  ``hi == lo`` gives all-zero codes and exact reconstruction.

The zero-preserving grid (codec versions 2, ``grid="zero"``, every grid codec's default):
see the section "zero-preserving grid" below -- the range widened to include 0, an integer
zero point, ``q = round_half_away(x / step) + zp``, and 0 decodes to exactly 0.
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


def _code_blocks(packed, bits: int, count: int):
    """The ``count`` ``bits``-bit codes of ``packed``, unpacked in blocks of BLOCK: yields (start, codes)."""
    a = np.frombuffer(packed, np.uint8) if not isinstance(packed, np.ndarray) else packed
    n8 = count - count % 8
    cb = np.empty(min(count, BLOCK), np.uint8)
    for s in range(0, count, BLOCK):
        e = min(count, s + BLOCK)
        if e <= n8:
            c = cb[: e - s]
            bitpack.unpack_into(a[s * bits // 8 : e * bits // 8], bits, c)
        else:
            c = bitpack.unpack(a[s * bits // 8 :], bits, e - s)
        yield s, c


def dequantize(packed, bits: int, count: int, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_pack`: a flat float32 array of ``count`` values."""
    if out is None:
        out = np.empty(count, np.float32)
    step = step_of(lo, hi, bits)
    lo32 = np.float32(lo)
    for s, c in _code_blocks(packed, bits, count):
        o = out[s : s + len(c)]
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


# ---------------------------------------------------------------------- zero-preserving grid
#
# The grid of every codec's default ``grid="zero"`` (codec versions 2): a level at exactly 0.
#
#     lo' = min(lo, 0), hi' = max(hi, 0)                 the range widened to include 0
#     (step, zp) = the smallest step, with its integer zero point zp in 0..2^b-1, whose
#                  levels (k - zp) step, k = 0..2^b-1, cover [lo', hi']:
#                  step(zp) = max(-lo'/zp, hi'/(2^b-1-zp)), first zp of the minimum
#     q     = round_half_away(x / step) + zp              (clipped to 0..2^b-1: float rounding only)
#     x_hat = (q - zp) step                               q == zp decodes to exactly 0
#     |x - x_hat| <= step/2 (+ float32 rounding)          for lo <= x <= hi
#
# The one exception is 1 bit with lo < 0 < hi: two levels cannot hold 0 and both signs, so
# the levels are {0, hi} if hi >= -lo, else {lo, 0}; the other sign rounds to 0 (clipped),
# and the error bound is max(step/2, the clipped side's magnitude).
#
# A ReLU activation (lo = 0) gets zp = 0 and step = hi/(2^b-1): the min-max grid, unchanged.
# For lo < 0 < hi the step is at most (hi - lo)/(2^b - 2) (one level lost, at most, to put
# one on 0).  The decoder multiplies the integer q - zp (exact in float32) by the float32 step.


def zero_grid(lo: float, hi: float, bits: int) -> tuple[np.float32, int]:
    """(step, zero point) of the zero-preserving grid covering [min(lo, 0), max(hi, 0)].

    The step is rounded up to float32 so the grid still covers the range; a range of
    zeros gives step 0 (every code is the zero point).
    """
    L = (1 << bits) - 1
    lo = min(float(lo), 0.0)
    hi = max(float(hi), 0.0)
    if hi == lo:
        return np.float32(0.0), 0
    zp = np.arange(L + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        neg = np.where(zp > 0, -lo / zp, np.inf if lo < 0 else 0.0)
        pos = np.where(zp < L, hi / (L - zp), np.inf if hi > 0 else 0.0)
    step = np.maximum(neg, pos)
    if not np.isfinite(step).any():
        # 1 bit across 0: levels {0, hi} or {lo, 0}; the side of the larger magnitude gets the
        # level (the other side rounds to 0, an error of at most its magnitude)
        z, s = (0, hi) if hi >= -lo else (1, -lo)
    else:
        z = int(np.argmin(step))
        s = float(step[z])
    s32 = np.float32(s)
    if float(s32) < s:
        s32 = np.nextafter(s32, np.float32(np.inf))
    if s32 <= 0:
        s32 = np.nextafter(np.float32(0), np.float32(1))
    return np.float32(s32), z


def zero_grids(lo: np.ndarray, hi: np.ndarray, bits) -> tuple[np.ndarray, np.ndarray]:
    """:func:`zero_grid` for arrays of ranges (and bit widths): (steps float32, zero points int64)."""
    lo = np.asarray(lo).ravel()
    hi = np.asarray(hi).ravel()
    b = np.broadcast_to(np.asarray(bits), lo.shape)
    out = [zero_grid(lo[i], hi[i], int(b[i])) for i in range(lo.size)]
    return (np.array([o[0] for o in out], np.float32), np.array([o[1] for o in out], np.int64))


def inv_step(step) -> np.ndarray:
    """1/step in float32 (0 for a zero step; capped at the float32 maximum)."""
    s = np.asarray(step, np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    return np.minimum(inv, np.finfo(np.float32).max).astype(np.float32)


def zero_codes_into(
    x: np.ndarray, inv, zp, bits, out: np.ndarray, tmp=None, itmp=None, nonneg: bool = False, clip: bool = False
) -> None:
    """uint8 codes round_half_away(x * inv) + zp, clipped to 0..2^b-1, into ``out``.

    ``inv``/``zp`` scalars or arrays broadcastable to ``x`` (``bits`` the widest of them,
    codes of narrower ones never exceed their own range but by float rounding, clipped by
    the caller's packing width).  The float->int cast truncates towards zero, so adding
    copysign(0.5, x) first rounds half away from zero; x = 0 gives exactly zp.

    ``nonneg=True`` (the caller knows min(x) >= 0, hence zp = 0: a ReLU activation) takes the
    min-max grid's 2-operation path, trunc(x * inv + 0.5): the same codes, half away from zero
    being half up for x >= 0.  ``clip=True``: values may lie far outside the grid (easyquant's
    clipped range); they are bounded before the integer cast.
    """
    if tmp is None:
        tmp = np.empty(x.shape, np.float32)
    if nonneg:
        np.multiply(x, np.asarray(inv, np.float32), out=tmp)
        np.add(tmp, np.float32(0.5), out=tmp)
        np.copyto(out, tmp, casting="unsafe")
        return
    if itmp is None:
        itmp = np.empty(x.shape, np.int16)
    np.multiply(x, np.asarray(inv, np.float32), out=tmp)
    np.add(tmp, np.copysign(np.float32(0.5), tmp), out=tmp)  # trunc(t + sign(t)/2) = half away
    if clip:
        np.clip(tmp, np.float32(-512.0), np.float32(512.0), out=tmp)  # far outside any grid: int16-safe
    np.copyto(itmp, tmp, casting="unsafe")
    np.add(itmp, np.asarray(zp, np.int16), out=itmp)
    np.clip(itmp, 0, np.asarray((1 << np.asarray(bits)) - 1, np.int16), out=itmp)
    np.copyto(out, itmp, casting="unsafe")


def zero_quantize_pack(x: np.ndarray, step, zp: int, bits: int, nonneg: bool = False, clip: bool = False) -> np.ndarray:
    """Blocked :func:`zero_codes_into` + packing of a flat array with one (step, zp);
    ``nonneg``: every value is >= 0 (then zp = 0), the fast path."""
    x = x.reshape(-1)
    n = x.size
    inv = inv_step(step)
    out = np.empty(bitpack.packed_size(n, bits), np.uint8)
    m = min(n, BLOCK)
    tmp = np.empty(m, np.float32)
    itmp = np.empty(m, np.int16)
    cb = np.empty(m + 8, np.uint8)
    n8 = n - n % 8
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        c = cb[: e - s]
        zero_codes_into(x[s:e], inv, zp, bits, c, tmp[: e - s], itmp[: e - s], nonneg, clip)
        if e <= n8:
            bitpack.pack_into(c, bits, out[s * bits // 8 : e * bits // 8])
        else:
            out[s * bits // 8 :] = bitpack.pack(c, bits, check=False)
    return out


def check_zero_grid(step, zp, bits, what: str) -> None:
    """Decoder checks of zero-grid parameters (arrays allowed): step >= 0 and every level finite."""
    from .format import PayloadError

    step = np.asarray(step, np.float64)
    zp = np.asarray(zp, np.int64)
    L = (1 << np.asarray(bits, np.int64)) - 1
    if (zp < 0).any() or (zp > L).any():
        raise PayloadError(f"{what} payload: zero point outside 0..2^bits-1")
    if (step < 0).any() or not np.isfinite(step).all():
        raise PayloadError(f"{what} payload: negative or non-finite step")
    if (step * np.maximum(zp, L - zp) > np.finfo(np.float32).max).any():
        raise PayloadError(f"{what} payload: grid levels overflow float32")


def zero_levels(step, zp: int, bits: int) -> np.ndarray:
    """The 2^b decoded values (k - zp) step, float32; level zp is exactly 0."""
    return (np.arange(1 << bits, dtype=np.float64) - zp).astype(np.float32) * np.float32(step)


def zero_dequantize(packed, bits: int, count: int, step, zp: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`zero_quantize_pack`: a flat float32 array of ``count`` values."""
    if out is None:
        out = np.empty(count, np.float32)
    for s, c in _code_blocks(packed, bits, count):
        zero_dequantize_codes(c, step, zp, out[s : s + len(c)])
    return out


def zero_dequantize_codes(codes: np.ndarray, step, zp, out: np.ndarray) -> None:
    """``out = (codes - zp) * step`` with broadcasting (per-channel or per-group parameters)."""
    np.subtract(codes, np.asarray(zp, np.int16), out=out, dtype=np.float32, casting="unsafe")
    np.multiply(out, np.asarray(step, np.float32), out=out)


def zero_error_bound(lo: float, hi: float, bits: int) -> float:
    """Max |x - x_hat| on the zero-preserving grid for values in [lo, hi]: half a step (or, for
    1 bit across 0, the clipped side) plus float32 rounding."""
    step, zp = zero_grid(lo, hi, bits)
    glo, ghi = -zp * float(step), ((1 << bits) - 1 - zp) * float(step)
    clip = max(0.0, glo - float(lo), float(hi) - ghi)
    mag = max(abs(float(lo)), abs(float(hi)))
    return max(0.5 * float(step) * (1 + 1e-5), clip) + 8 * 2.0**-24 * mag


def roundtrip(x: np.ndarray, lo: float, hi: float, bits: int, grid: str) -> np.ndarray:
    """x_hat of a flat float32 array on either grid (for the codecs' parameter searches).

    Values outside [lo, hi] are clipped to the grid's end levels (no packing, float32)."""
    codes = np.empty(x.shape, np.uint8)
    out = np.empty(x.shape, np.float32)
    if grid == "minmax":
        c = np.clip(x, np.float32(lo), np.float32(hi))
        codes_into(c, np.float32(lo), scale_of(lo, hi, bits), codes)
        dequantize_codes(codes, np.float32(lo), step_of(lo, hi, bits), out)
    else:
        step, zp = zero_grid(lo, hi, bits)
        zero_codes_into(x, inv_step(step), zp, bits, codes, clip=True)
        zero_dequantize_codes(codes, step, zp, out)
    return out
