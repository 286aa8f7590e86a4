"""``fp32`` (identity, the reference for traffic ratios) and ``fp16`` (cast to IEEE half).

fp32 payload (codec version 1): no parameters; section 0 = the float32 values, C order.
    bytes = 36 + 4 S + 4 * N*C*H*W, S = 1  ->  40 + 4 n

fp16 payload (codec version 1): no parameters; section 0 = the float16 values.
    bytes = 40 + 2 n

fp16 interpretation: values beyond the half range are saturated to +-65504 (the largest
finite half) instead of becoming infinities; values below 2^-24 flush to (signed) zero;
rounding is IEEE round-to-nearest-even (numpy's cast).  Error bound for |x| <= 65504:
|x - x_hat| <= 2^-11 |x| + 2^-25.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .base import Codec, check_finite, expect_sections, f32, prod, read_struct

_HALF_MAX = np.float32(65504.0)
BLOCK = 1 << 18


class FP32(Codec):
    name = "fp32"
    PARAMS = {}

    def _encode(self, x, *, round, total_rounds, training):  # noqa: A002
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


def to_half(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 with saturation at +-65504, block by block."""
    flat = x.reshape(-1)
    out = np.empty(flat.size, np.float16)
    tmp = np.empty(min(flat.size, BLOCK), np.float32)
    for s in range(0, flat.size, BLOCK):
        e = min(flat.size, s + BLOCK)
        t = tmp[: e - s]
        np.clip(flat[s:e], -_HALF_MAX, _HALF_MAX, out=t)
        out[s:e] = t
    return out


class FP16(Codec):
    name = "fp16"
    PARAMS = {}

    def _encode(self, x, *, round, total_rounds, training):  # noqa: A002
        check_finite(x.min(), x.max())
        return b"", [to_half(x)]

    @classmethod
    def _decode(cls, h: fmt.Header):
        read_struct(h, "")
        n = prod(h.shape)
        expect_sections(h, [2 * n])
        half = np.frombuffer(h.sections[0], "<f2")
        out = half.astype(np.float32).reshape(h.shape)
        if n and not (np.isfinite(out.min()) and np.isfinite(out.max())):
            raise fmt.PayloadError("fp16 values: NaN or Inf in the payload")
        return out, {}

    def error_bound(self, x, meta=None):
        m = float(np.max(np.abs(x))) if x.size else 0.0
        return 2.0**-11 * min(m, 65504.0) + 2.0**-25 + max(0.0, m - 65504.0)
