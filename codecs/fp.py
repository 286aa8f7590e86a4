"""``fp32`` (identity, the reference for traffic ratios) and ``fp16`` (cast to IEEE half).

fp32 payload (codec version 1): no parameters; section 0 = the float32 values, C order.
    bytes = 36 + 4 S + 4 * N*C*H*W, S = 1  ->  40 + 4 n

fp16 payload (codec version 1): no parameters; section 0 = the float16 values.
    bytes = 40 + 2 n

fp16 interpretation: values beyond the half range are saturated to +-65504 (the largest
finite half) instead of becoming infinities; below the smallest half subnormal 2^-24 values round
like the rest: |x| <= 2^-25 becomes (signed) zero, 2^-25 < |x| < 2^-24 becomes +-2^-24;
rounding is IEEE round-to-nearest-even, done with integer operations on the float32
bits. The results are bit-identical to clipping and numpy's float16 cast, which is slower here: it
is slow on zeros and subnormal halves, and ReLU activations are half zeros, gradients small
(``splitedge bench fp16-cast`` times both and checks them equal; figures in docs/codecs.md).  Error bound for |x| <= 65504:
|x - x_hat| <= 2^-11 |x| + 2^-25.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .base import Codec, check_finite, expect_sections, f32, prod, read_struct
from .registry import register

_HALF_MAX = np.float32(65504.0)


@register("fp32", wire_id=1)
class FP32(Codec):
    PARAMS = {}

    def _encode(self, x, *, step, total_rounds, training):
        check_finite(x.min(), x.max())
        return b"", [x]

    @classmethod
    def _decode(cls, h: fmt.Header):
        read_struct(h, "")
        n = prod(h.shape)
        expect_sections(h, [4 * n])
        a = f32(h.sections[0], n, "fp32 values").reshape(h.shape).copy()
        return a, {}

    def error_bound(self, x, meta=None):
        return 0.0


HALF_BLOCK = 1 << 16  # elements per block: the temporaries (256 KiB each) stay in cache

_U = np.uint32


def to_half(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bits (uint16), round to nearest even, saturating at +-65504 (no infinities).

    Normal halves: rebias the exponent (subtract (127 - 15) << 23) and round the 13 dropped
    mantissa bits to nearest even (add 0xFFF + the lowest kept bit, shift).  Subnormal
    halves (|x| < 2^-14): adding 0.5f puts round_ne(|x| * 2^24) in the low mantissa bits.
    Integer operations on the float32 bits, in place, block by block.
    """
    flat = x.reshape(-1)
    n = flat.size
    out = np.empty(n, np.uint16)
    m = min(n, HALF_BLOCK)
    fa, sg, t, sub, small = (np.empty(m, np.uint32) for _ in range(5))
    for s in range(0, n, HALF_BLOCK):
        e = min(n, s + HALF_BLOCK)
        k = e - s
        a, sgn, tt, sb, sm = fa[:k], sg[:k], t[:k], sub[:k], small[:k]
        af = a.view(np.float32)
        np.clip(flat[s:e], -_HALF_MAX, _HALF_MAX, out=af)
        np.right_shift(a, _U(16), out=sgn)
        np.bitwise_and(sgn, _U(0x8000), out=sgn)
        np.bitwise_and(a, _U(0x7FFFFFFF), out=a)
        np.subtract(a, _U(0x38800000), out=sm)  # top bit set where a < 0x38800000 (subnormal half)
        np.right_shift(sm, _U(31), out=sm)
        np.negative(sm, out=sm)  # all ones where subnormal: a branch-free select mask
        np.add(af, np.float32(0.5), out=sb.view(np.float32))
        np.subtract(sb, _U(0x3F000000), out=sb)
        np.right_shift(a, _U(13), out=tt)
        np.bitwise_and(tt, _U(1), out=tt)
        np.add(tt, a, out=tt)
        np.add(tt, _U((0x0FFF - 0x38000000) & 0xFFFFFFFF), out=tt)  # wraps for small a: replaced below
        np.right_shift(tt, _U(13), out=tt)
        np.bitwise_xor(sb, tt, out=sb)  # tt ^= (tt ^ sub) & mask
        np.bitwise_and(sb, sm, out=sb)
        np.bitwise_xor(tt, sb, out=tt)
        np.bitwise_or(tt, sgn, out=tt)
        np.copyto(out[s:e], tt, casting="unsafe")
    return out


def from_half(h: np.ndarray) -> np.ndarray:
    """IEEE half bits (uint16) -> float32, exact; raises PayloadError on NaN/Inf codes."""
    n = h.size
    if n and int((h & np.uint16(0x7FFF)).max()) >= 0x7C00:
        raise fmt.PayloadError("fp16 values: NaN or Inf in the payload")
    out = np.empty(n, np.float32)
    m = min(n, HALF_BLOCK)
    ee, sg, r, sb, small = (np.empty(m, np.uint32) for _ in range(5))
    for s in range(0, n, HALF_BLOCK):
        e_ = min(n, s + HALF_BLOCK)
        k = e_ - s
        e, sgn, rr, sub, sm = ee[:k], sg[:k], r[:k], sb[:k], small[:k]
        np.copyto(e, h[s:e_])
        np.bitwise_and(e, _U(0x8000), out=sgn)
        np.left_shift(sgn, _U(16), out=sgn)
        np.bitwise_and(e, _U(0x7FFF), out=e)
        np.subtract(e, _U(0x0400), out=sm)  # all ones where subnormal (branch-free select mask)
        np.right_shift(sm, _U(31), out=sm)
        np.negative(sm, out=sm)
        np.copyto(sub.view(np.float32), e, casting="unsafe")  # exact: e < 2^15
        np.multiply(sub.view(np.float32), np.float32(2.0**-24), out=sub.view(np.float32))
        np.left_shift(e, _U(13), out=rr)
        np.add(rr, _U(0x38000000), out=rr)
        np.bitwise_xor(sub, rr, out=sub)
        np.bitwise_and(sub, sm, out=sub)
        np.bitwise_xor(rr, sub, out=rr)
        np.bitwise_or(rr, sgn, out=rr)
        np.copyto(out[s:e_], rr.view(np.float32))
    return out


@register("fp16", wire_id=2)
class FP16(Codec):
    PARAMS = {}

    def _encode(self, x, *, step, total_rounds, training):
        check_finite(x.min(), x.max())
        return b"", [to_half(x)]

    @classmethod
    def _decode(cls, h: fmt.Header):
        read_struct(h, "")
        n = prod(h.shape)
        expect_sections(h, [2 * n])
        return from_half(np.frombuffer(h.sections[0], "<u2")).reshape(h.shape), {}

    def error_bound(self, x, meta=None):
        m = float(np.max(np.abs(x))) if x.size else 0.0
        return 2.0**-11 * min(m, 65504.0) + 2.0**-25 + max(0.0, m - 65504.0)
