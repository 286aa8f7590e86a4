"""``clio``: progressive slicing (CLIO [12] in sgq.md), the baseline at the same traffic as n-bit UQ.

    s = ceil(C * n / 32)      slices (channels) sent, the first s channels, in float32
    x_hat[:, :s] = x[:, :s],  x_hat[:, s:] = 0

so the traffic s/C * 32 bits per element matches n-bit UQ (rounded up to whole channels).
``bits`` may be 1..32 (32 sends everything).  Interpretation: the slices are the leading
channels in their natural order (CLIO trains the model so that leading slices carry the
most information; here the split model is trained as is).

backward: the exact Jacobian of this map -- the gradient of the first s channels passes,
the others are zero (they did not reach the cloud).

Payload (codec version 1): params u8 n (P = 1); sec 0 = f32 x[:, :s] in C order.

    bytes = 36 + 1 + 4 + 4 * N * s * H * W

meta from decode_with_meta: ``kept_channels`` (= s), ``bits``.
"""

from __future__ import annotations

import math

import numpy as np

from . import format as fmt
from .base import Codec, as3, bits_param, check_finite, check_grad, expect_sections, f32, prod, read_struct
from .registry import register


def slices(c: int, bits: int) -> int:
    return min(c, math.ceil(c * bits / 32))


@register("clio", wire_id=10)
class Clio(Codec):
    PARAMS = {"bits": bits_param(4, 1, 32)}

    def _encode(self, x, *, step, total_rounds, training):
        x3 = as3(x)
        b = self._p["bits"]
        kept = x3[:, : slices(x3.shape[1], b), :]
        check_finite(x3.min(), x3.max())
        return bytes([b]), [np.ascontiguousarray(kept)]

    @classmethod
    def _decode(cls, h: fmt.Header):
        (b,) = read_struct(h, "B")
        if not 1 <= b <= 32:
            raise fmt.PayloadError(f"clio payload: bits {b} outside 1..32")
        n, c = h.shape[0], h.shape[1]
        s = prod(h.shape[2:])
        k = slices(c, b)
        expect_sections(h, [4 * n * k * s])
        out = np.zeros((n, c, s), np.float32)
        out[:, :k, :] = f32(h.sections[0], n * k * s, "clio slices").reshape(n, k, s)
        return out.reshape(h.shape), {"bits": b, "kept_channels": k}

    def backward(self, grad, meta):
        g = check_grad(grad, meta).copy()
        as3(g)[:, int(meta["kept_channels"]) :, :] = 0.0
        return g

    def error_bound(self, x, meta=None):
        x3 = as3(np.ascontiguousarray(x, np.float32))
        k = slices(x3.shape[1], self._p["bits"])
        rest = x3[:, k:, :]
        return float(np.abs(rest).max()) if rest.size else 0.0
