"""``easyquant``: data-free quantization with outliers kept (EasyQuant [37] in sl-acc.txt, Tang et al. 2023).

    mu, sigma = mean and standard deviation of the tensor
    outliers  = { i : |x_i - mu| > k sigma }            kept exactly: float32 value + index
    inliers quantized uniformly in a tuned range [lo, hi] (values outside it are clipped):
        q = round((clip(x, lo, hi) - lo) / (hi - lo) (2^n - 1)),  x_hat = lo + q step

EasyQuant tunes the quantization range of each weight matrix by gradient descent on the
reconstruction error; this codec, per tensor, searches the range instead (data-free,
deterministic): with lo0, hi0 the inlier min/max, lo = mu - t_lo (mu - lo0) and
hi = mu + t_hi (hi0 - mu) for t_lo, t_hi in {1.0, 0.9, ..., 0.5}, minimizing the
squared error over a strided subsample of at most 8192 inliers (ties -> wider range).
One range per tensor (the paper's per-channel ranges are for weight rows).  Codes are
written for every element, outlier positions included (a simpler layout at n bits per
outlier), and outliers overwrite them on decode.

Payload (codec version 1):

    params   u8 n                                                          (P = 1)
    sec 0    f32[2]     lo, hi
    sec 1    packed     outlier flat indices, increasing, ceil(log2 N C H W) bits each
    sec 2    f32[K]     outlier values
    sec 3    packed     codes of every element, ceil(n N C H W / 8) bytes

    bytes = 36 + 1 + 16 + 8 + ceil(K ceil(log2 M) / 8) + 4 K + ceil(n M / 8),  M = N C H W

meta from decode_with_meta: ``outliers`` (K,) int64 flat indices, ``min``, ``max``, ``bits``.
backward: identity (STE).
"""

from __future__ import annotations

import numpy as np

from . import _linear, bitpack
from . import format as fmt
from .base import Codec, Param, bits_param, check_finite, expect_sections, f32, prod, read_struct

SHRINK = np.round(np.linspace(1.0, 0.5, 6), 6)
SEARCH_SAMPLE = 8192


def _qerr(xs: np.ndarray, lo: float, hi: float, bits: int) -> float:
    c = np.clip(xs, np.float32(lo), np.float32(hi))
    codes = np.empty(c.shape, np.uint8)
    _linear.codes_into(c, np.float32(lo), _linear.scale_of(lo, hi, bits), codes)
    r = np.empty(c.shape, np.float32)
    _linear.dequantize_codes(codes, np.float32(lo), _linear.step_of(lo, hi, bits), r)
    r -= xs
    return float(np.dot(r, r))


class EasyQuant(Codec):
    name = "easyquant"
    PARAMS = {
        "bits": bits_param(4),
        "k_sigma": Param(3.0, float, 0.1, 1e6, doc="outlier threshold in standard deviations"),
    }

    def search_range(self, inl: np.ndarray, mu: float) -> tuple[float, float]:
        b = self._p["bits"]
        lo0, hi0 = float(inl.min()), float(inl.max())
        step = max(1, inl.size // SEARCH_SAMPLE)
        xs = np.ascontiguousarray(inl[::step][:SEARCH_SAMPLE])
        best, best_r = np.inf, (lo0, hi0)
        for tl in SHRINK:
            for th in SHRINK:
                lo = np.float32(mu - tl * (mu - lo0))
                hi = np.float32(mu + th * (hi0 - mu))
                lo, hi = float(min(lo, hi0)), float(max(hi, lo0))
                e = _qerr(xs, lo, hi, b)
                if e < best:
                    best, best_r = e, (lo, hi)
        return best_r

    def _encode(self, x, *, round, total_rounds, training):  # noqa: A002
        b = self._p["bits"]
        flat = x.reshape(-1)
        lo, hi = _linear.minmax(flat)
        check_finite(lo, hi)
        mu = float(flat.mean(dtype=np.float64))
        sd = float(flat.std(dtype=np.float64))
        out_mask = np.abs(flat - np.float32(mu)) > np.float32(self._p["k_sigma"] * sd)
        oidx = np.flatnonzero(out_mask)
        inl = flat[~out_mask] if oidx.size else flat
        rlo, rhi = self.search_range(inl, mu) if inl.size else (float(lo), float(hi))
        clipped = np.clip(flat, np.float32(rlo), np.float32(rhi))
        packed = _linear.quantize_pack(clipped, np.float32(rlo), np.float32(rhi), b)
        ib = bitpack.index_bits(flat.size)
        sections = [
            np.array([rlo, rhi], "<f4"),
            bitpack.pack_wide(oidx, ib),
            flat[oidx].astype("<f4"),
            packed,
        ]
        return bytes([b]), sections

    @classmethod
    def _decode(cls, h: fmt.Header):
        (b,) = read_struct(h, "B")
        if not 1 <= b <= 8:
            raise fmt.PayloadError(f"easyquant payload: bit width {b} outside 1..8")
        m = prod(h.shape)
        expect_sections(h, [8, None, None, bitpack.packed_size(m, b)])
        lo, hi = (float(v) for v in f32(h.sections[0], 2, "easyquant range"))
        if hi < lo:
            raise fmt.PayloadError(f"easyquant payload: range max {hi} < min {lo}")
        vals = f32(h.sections[2], None, "easyquant outlier values")
        k = vals.size
        ib = bitpack.index_bits(m)
        if k > m or h.sections[1].nbytes != bitpack.packed_size(k, ib):
            raise fmt.PayloadError(
                f"easyquant payload: {h.sections[1].nbytes} index bytes for {k} outliers of {ib} bits"
            )
        idx = bitpack.unpack_wide(h.sections[1], ib, k).astype(np.int64)
        if k and (idx.max() >= m or (k > 1 and (np.diff(idx) <= 0).any())):
            raise fmt.PayloadError("easyquant payload: outlier indices out of range or not increasing")
        out = _linear.dequantize(np.frombuffer(h.sections[3], np.uint8), b, m, lo, hi)
        out[idx] = vals
        return out.reshape(h.shape), {"outliers": idx, "min": lo, "max": hi, "bits": b}

    def error_bound(self, x, meta=None):
        if meta is None:
            return None
        flat = np.asarray(x, np.float32).reshape(-1)
        mask = np.ones(flat.size, bool)
        mask[meta["outliers"]] = False
        inl = flat[mask]
        if not inl.size:
            return 0.0
        lo, hi = meta["min"], meta["max"]
        clip = max(0.0, lo - float(inl.min()), float(inl.max()) - hi)
        return clip + _linear.error_bound(lo, hi, meta["bits"])
