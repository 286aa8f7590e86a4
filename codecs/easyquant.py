"""``easyquant``: data-free quantization with outliers kept (EasyQuant [37] in sl-acc.txt, Tang et al. 2023).

    mu, sigma = mean and standard deviation of the tensor
    outliers  = { i : |x_i - mu| > k sigma }            kept exactly: float32 value + index
    inliers quantized uniformly in a tuned range [lo, hi] (values outside it are clipped),
    by default (``grid="zero"``, codec version 2) on the zero-preserving grid of _linear.py
    over [min(lo, 0), max(hi, 0)]:
        q = clip(round_half_away(x / step) + zp, 0, 2^n - 1),  x_hat = (q - zp) step
    and with ``grid="minmax"`` (codec version 1, the ablation):
        q = round((clip(x, lo, hi) - lo) / (hi - lo) (2^n - 1)),  x_hat = lo + q step

The zero grid is an interpretation: the usual asymmetric weight quantizer of the LLM methods
EasyQuant compares with (GPTQ's) rounds x/step and adds an integer zero point, so 0 is one of
its levels, and nothing in EasyQuant's range search needs a grid without 0.

EasyQuant tunes the quantization range of each weight matrix by gradient descent on the
reconstruction error; this codec, per tensor, searches the range instead (data-free,
deterministic): with lo0, hi0 the inlier min/max, lo = mu - t_lo (mu - lo0) and
hi = mu + t_hi (hi0 - mu) for t_lo, t_hi in {1.0, 0.9, ..., 0.5}, minimizing the
squared error over a strided subsample of at most 8192 inliers (ties -> wider range).
One range per tensor (the paper's per-channel ranges are for weight rows).  Codes are
written for every element, outlier positions included (a simpler layout at n bits per
outlier), and outliers overwrite them on decode.

Payload (codec version 2):

    params   u8 n, u8 zp                                                   (P = 2)
    sec 0    f32[1]     step
    sec 1    packed     outlier flat indices, increasing, ceil(log2 N C H W) bits each
    sec 2    f32[K]     outlier values
    sec 3    packed     codes of every element, ceil(n N C H W / 8) bytes

    bytes = 36 + 2 + 16 + 4 + ceil(K ceil(log2 M) / 8) + 4 K + ceil(n M / 8),  M = N C H W

Codec version 1: params u8 n (P = 1), sec 0 f32[2] (lo, hi); bytes = 36 + 1 + 16 + 8 + ...

meta from decode_with_meta: ``outliers`` (K,) int64 flat indices, ``min``, ``max`` (the grid's
end levels), ``bits``, and in version 2 ``step``, ``zero_point``.
backward: identity (STE).
"""

from __future__ import annotations

import numpy as np

from . import _linear, bitpack
from . import format as fmt
from .base import Codec, Param, bits_param, check_finite, expect_sections, f32, grid_param, prod, read_struct
from .registry import register

SHRINK = np.round(np.linspace(1.0, 0.5, 6), 6)
SEARCH_SAMPLE = 8192


def _qerr(xs: np.ndarray, lo: float, hi: float, bits: int, grid: str = "minmax") -> float:
    r = _linear.roundtrip(xs, lo, hi, bits, grid)
    r -= xs
    return float(np.dot(r, r))


@register("easyquant", wire_id=11)
class EasyQuant(Codec):
    PARAMS = {
        "bits": bits_param(4),
        "k_sigma": Param(3.0, float, 0.1, 1e6, doc="outlier threshold in standard deviations"),
        "grid": grid_param(),
    }
    version = 2
    read_versions = (1, 2)
    minmax_version = 1

    def search_range(self, inl: np.ndarray, mu: float) -> tuple[float, float]:
        b = self._p["bits"]
        lo0, hi0 = float(inl.min()), float(inl.max())
        step = max(1, inl.size // SEARCH_SAMPLE)
        xs = np.ascontiguousarray(inl[::step][:SEARCH_SAMPLE])
        best, best_r = np.inf, (lo0, hi0)
        for tl in SHRINK:
            for th in SHRINK:
                lo32 = np.float32(mu - tl * (mu - lo0))
                hi32 = np.float32(mu + th * (hi0 - mu))
                # lo0 and hi0 are float32 values, so comparing as float picks the same bound
                lo, hi = min(float(lo32), hi0), max(float(hi32), lo0)
                e = _qerr(xs, lo, hi, b, self._p["grid"])
                if e < best:
                    best, best_r = e, (lo, hi)
        return best_r

    def _encode(self, x, *, step, total_rounds, training):
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
        if self._p["grid"] == "minmax":
            clipped = np.clip(flat, np.float32(rlo), np.float32(rhi))
            packed = _linear.quantize_pack(clipped, np.float32(rlo), np.float32(rhi), b)
            head, params = np.array([rlo, rhi], "<f4"), bytes([b])
        else:  # the codes clip to the grid's end levels
            qstep, zp = _linear.zero_grid(rlo, rhi, b)
            packed = _linear.zero_quantize_pack(flat, qstep, zp, b, clip=True)
            head, params = np.array([qstep], "<f4"), bytes([b, zp])
        ib = bitpack.index_bits(flat.size)
        sections = [
            head,
            bitpack.pack_wide(oidx, ib),
            flat[oidx].astype("<f4"),
            packed,
        ]
        return params, sections

    @classmethod
    def _decode(cls, h: fmt.Header):
        v2 = h.codec_version == 2
        b, zp = read_struct(h, "BB") if v2 else (*read_struct(h, "B"), 0)
        if not 1 <= b <= 8:
            raise fmt.PayloadError(f"easyquant payload: bit width {b} outside 1..8")
        m = prod(h.shape)
        expect_sections(h, [4 if v2 else 8, None, None, bitpack.packed_size(m, b)])
        if v2:
            (step,) = (float(v) for v in f32(h.sections[0], 1, "easyquant step"))
            _linear.check_zero_grid(step, zp, b, "easyquant")
            lo, hi = -zp * step, ((1 << b) - 1 - zp) * step
        else:
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
        if v2:
            out = _linear.zero_dequantize(np.frombuffer(h.sections[3], np.uint8), b, m, np.float32(step), zp)
        else:
            out = _linear.dequantize(np.frombuffer(h.sections[3], np.uint8), b, m, lo, hi)
        out[idx] = vals
        meta = {"outliers": idx, "min": lo, "max": hi, "bits": b}
        if v2:
            meta.update(step=step, zero_point=zp)
        return out.reshape(h.shape), meta

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
        if "step" in meta:  # the zero grid: half a step inside [lo, hi]
            return clip + 0.5 * meta["step"] * (1 + 1e-5) + 8 * 2.0**-24 * max(abs(lo), abs(hi))
        return clip + _linear.error_bound(lo, hi, meta["bits"])
