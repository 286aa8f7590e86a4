"""``powerquant``: power-function non-uniform quantization (PowerQuant [36] in sl-acc.txt, Yvinec et al.).

    y     = sign(x) |x|^a                                  the automorphism, 0 < a <= 1
    q     = round_half_away(y / step) + zp                 uniform n-bit on the zero grid (default)
    y_hat = (q - zp) step                                  0 decodes to exactly 0
    x_hat = sign(y_hat) |y_hat|^(1/a)

(step, zp): the zero-preserving grid of _linear.py over [min(y_min, 0), max(y_max, 0)]
(``grid="zero"``, codec version 2).  PowerQuant's automorphism is odd and made for symmetric
quantization, so a grid with a level at 0 is the paper's own; ``grid="minmax"`` (codec
version 1, the ablation) is q = round((y - y_min) / (y_max - y_min) (2^n - 1)),
y_hat = y_min + q (y_max - y_min) / (2^n - 1), with no level at 0.

y_min = f(x_min), y_max = f(x_max) (f is increasing).  The exponent is chosen per tensor
by a small search, as the paper's automorphism search: a in {0.25, 0.30, ..., 1.00}
(16 values), minimizing the mean squared reconstruction error in x on a deterministic
strided subsample of at most 16384 elements (ties -> the larger a); ``a`` may also be
fixed by the parameter of that name.  a = 1 is plain UQ.  Small values get finer
levels, which suits activations and gradients concentrated near zero.

Error bound (used by the tests): the inverse map is Lipschitz on [-Y, Y], Y = max|y|,
with constant (1/a) Y^(1/a - 1), so |x - x_hat| <= (1/a) Y^(1/a - 1) (y_max - y_min) /
(2 (2^n - 1)) plus float32 rounding.

Payload (codec version 2): params u8 n, u8 zp (P = 2); sec 0 = f32 [a, step];
sec 1 = packed codes, ceil(n N C H W / 8) bytes.   bytes = 36 + 2 + 8 + 8 + ceil(n N C H W / 8)
(version 1: params u8 n; sec 0 = f32 [a, y_min, y_max]; bytes = 36 + 1 + 8 + 12 + ceil(...)).

meta from decode_with_meta: ``a``, ``bits``, ``min``, ``max`` (of y: the grid's end levels),
and in version 2 ``step``, ``zero_point``.  backward: identity (STE).
"""

from __future__ import annotations

import numpy as np

from . import _linear, bitpack
from . import format as fmt
from .base import Codec, Param, bits_param, check_finite, expect_sections, f32, grid_param, prod, read_struct
from .registry import register

GRID = np.round(np.linspace(0.25, 1.0, 16), 6)
SEARCH_SAMPLE = 16384


def forward_map(x: np.ndarray, a: float) -> np.ndarray:
    y = np.abs(x)
    np.power(y, np.float32(a), out=y)
    return np.copysign(y, x, out=y)


def inverse_map(y: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(y)
    np.power(x, np.float32(1.0 / a), out=x)
    return np.copysign(x, y, out=x)


def _mse(xs: np.ndarray, a: float, lo: float, hi: float, bits: int, grid: str = "minmax") -> float:
    ylo = float(forward_map(np.array([lo], np.float32), a)[0])
    yhi = float(forward_map(np.array([hi], np.float32), a)[0])
    yh = _linear.roundtrip(forward_map(xs, a), ylo, yhi, bits, grid)
    d = inverse_map(yh, a) - xs
    return float(np.dot(d, d))


@register("powerquant", wire_id=7)
class PowerQuant(Codec):
    PARAMS = {
        "bits": bits_param(4),
        "a": Param(None, float, 0.01, 1.0, optional=True, doc="fixed exponent (None: search the grid)"),
        "grid": grid_param(),
    }
    version = 2
    read_versions = (1, 2)
    minmax_version = 1

    def choose_exponent(self, x: np.ndarray, lo: float, hi: float) -> float:
        if self._p["a"] is not None:
            return float(self._p["a"])
        flat = x.reshape(-1)
        step = max(1, flat.size // SEARCH_SAMPLE)
        xs = np.ascontiguousarray(flat[::step][:SEARCH_SAMPLE])
        best, best_a = np.inf, 1.0
        for a in GRID[::-1]:  # from 1.0 down: strict improvement needed, so ties keep the larger a
            e = _mse(xs, float(a), lo, hi, self._p["bits"], self._p["grid"])
            if e < best:
                best, best_a = e, float(a)
        return best_a

    def _encode(self, x, *, step, total_rounds, training):
        b = self._p["bits"]
        lo, hi = _linear.minmax(x)
        check_finite(lo, hi)
        a = self.choose_exponent(x, float(lo), float(hi))
        ylo, yhi = forward_map(np.array([lo, hi], np.float32), a)
        y = forward_map(x.reshape(-1), a)
        if self._p["grid"] == "minmax":
            packed = _linear.quantize_pack(y, ylo, yhi, b)
            return bytes([b]), [np.array([a, ylo, yhi], "<f4"), packed]
        qstep, zp = _linear.zero_grid(ylo, yhi, b)
        packed = _linear.zero_quantize_pack(y, qstep, zp, b, nonneg=bool(ylo >= 0))
        return bytes([b, zp]), [np.array([a, qstep], "<f4"), packed]

    @classmethod
    def _decode(cls, h: fmt.Header):
        v2 = h.codec_version == 2
        b, zp = read_struct(h, "BB") if v2 else (*read_struct(h, "B"), 0)
        if not 1 <= b <= 8:
            raise fmt.PayloadError(f"powerquant payload: bit width {b} outside 1..8")
        n = prod(h.shape)
        expect_sections(h, [8 if v2 else 12, bitpack.packed_size(n, b)])
        if v2:
            a, step = (float(v) for v in f32(h.sections[0], 2, "powerquant parameters"))
        else:
            a, ylo, yhi = (float(v) for v in f32(h.sections[0], 3, "powerquant parameters"))
        if not 0.0 < a <= 1.0:
            raise fmt.PayloadError(f"powerquant payload: exponent {a} outside (0, 1]")
        if v2:
            _linear.check_zero_grid(step, zp, b, "powerquant")
            ylo, yhi = -zp * step, ((1 << b) - 1 - zp) * step
            y = _linear.zero_dequantize(np.frombuffer(h.sections[1], np.uint8), b, n, np.float32(step), zp)
        elif yhi < ylo:
            raise fmt.PayloadError(f"powerquant payload: range max {yhi} < min {ylo}")
        else:
            y = _linear.dequantize(np.frombuffer(h.sections[1], np.uint8), b, n, ylo, yhi)
        with np.errstate(over="ignore"):
            out = inverse_map(y, a)
        if n and not np.isfinite(out).all():
            raise fmt.PayloadError("powerquant payload: values overflow float32")
        meta = {"a": a, "bits": b, "min": ylo, "max": yhi}
        if v2:
            meta.update(step=step, zero_point=zp)
        return out.reshape(h.shape), meta

    def error_bound(self, x, meta=None):
        if meta is None:
            return None
        a, b = meta["a"], meta["bits"]
        x = np.asarray(x, np.float32)
        ylo, yhi = (float(v) for v in forward_map(np.array([x.min(), x.max()], np.float32), a))
        Y = max(abs(ylo), abs(yhi))
        if self._p["grid"] == "minmax":
            half = 0.5 * (yhi - ylo) / ((1 << b) - 1)
        else:
            half = 0.5 * float(_linear.zero_grid(ylo, yhi, b)[0])
        lip = (1.0 / a) * (Y + half) ** (1.0 / a - 1.0)
        return lip * half * (1 + 1e-3) + 1e-5 * float(np.abs(x).max())
