"""``randtopk``: randomized top-k sparsification (Zheng et al., IJCAI 2023; [25] in sl-acc.txt).

Per sample (row of d = C*H*W features):

    k   = max(1, round(rate * d))                 (round half up; k <= d)
    T   = the k indices of largest |x|             (np.argpartition: ties at the k-th value are broken
                                                    in its deterministic but unspecified order)
    p_i = (1 - alpha) / k     for i in T
    p_i = alpha / (d - k)     otherwise
    draw k distinct indices with probabilities p (sampling without replacement, drawn
    as the k largest log p_i + Gumbel_i: the Efraimidis-Spirakis / Gumbel-top-k form of
    successive draws, which is what torch.multinomial(replacement=False) samples;
    computed in O(k) per sample from order statistics, see RandTopk._sample)
    send their values (float32) and indices; the rest is 0 on the cloud.

Evaluation (``training=False``): plain top-k, deterministic.  Values are sent unscaled
(no 1/p reweighting, as in the paper).  alpha = 0 is top-k; alpha -> 1 is random-k.

backward: the gradient goes back on the same support: dL/dQ(X) times the kept mask.

Traffic, as the official code accounts it: k/d * (1 + ceil(log2 d)/32) of the float32
tensor, i.e. per kept element 32 value bits + ceil(log2 d) index bits.  Payload:

    params   u32 k, u8 b = ceil(log2 d)                                    (P = 5)
    sec 0    f32[N, k]      values, indices increasing within each sample
    sec 1    packed         indices, b bits each (bitpack.pack_wide: byte planes + remainder)

    bytes = 36 + 5 + 8 + 4 N k + ceil(N k b / 8)

meta from decode_with_meta: ``mask`` (bool, the tensor's shape), ``indices`` (N, k) int64, ``k``.
"""

from __future__ import annotations

import math

import numpy as np

from . import bitpack
from . import format as fmt
from .base import Codec, Param, check_finite, check_grad, expect_sections, f32, prod, read_struct, seed_param
from .registry import register


def k_of(rate: float, d: int) -> int:
    return min(d, max(1, int(math.floor(rate * d + 0.5))))


@register("randtopk", wire_id=8)
class RandTopk(Codec):
    PARAMS = {
        "rate": Param(0.1, float, 1e-9, 1.0, doc="kept fraction of each sample's features"),
        "alpha": Param(0.1, float, 0.0, 0.999999, doc="probability mass of the non-top-k features"),
        "seed": seed_param(),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._rng = np.random.default_rng(self._p["seed"])

    def select(self, x2: np.ndarray, training: bool) -> np.ndarray:
        """Kept indices (N, k), increasing within each row."""
        n, d = x2.shape
        k = k_of(self._p["rate"], d)
        if k == d:
            return np.broadcast_to(np.arange(d), (n, d)).copy()
        top = np.sort(np.argpartition(-np.abs(x2), k - 1, axis=1)[:, :k], axis=1)
        alpha = self._p["alpha"]
        if not training or alpha == 0.0:
            return top
        return np.sort(self._sample(top, d, k, alpha), axis=1)

    def _sample(self, top: np.ndarray, d: int, k: int, alpha: float) -> np.ndarray:
        """Gumbel-top-k over all d features in O(k) per sample.

        Keys are log p_i + Gumbel_i.  The k top-|x| features each need their key.  Of the
        m = d - k others, only their k largest keys can be among the overall k largest;
        those are the top order statistics of m Gumbels, -log of the smallest m-sample
        exponential order statistics (Renyi: X_(r) = sum_{i<=r} E_i / (m - i + 1)), and
        which of the m features carry them is a uniformly random subset.
        """
        n = top.shape[0]
        m = d - k
        rng = self._rng
        u = rng.random((n, k))
        key_t = math.log((1.0 - alpha) / k) - np.log(-np.log(np.maximum(u, 1e-300)))
        kr = min(k, m)
        e = rng.standard_exponential((n, kr))
        key_r = math.log(alpha / m) - np.log(np.cumsum(e / (m - np.arange(kr)), axis=1))
        keys = np.concatenate([key_t, key_r], axis=1)
        win = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        from_t = win < k
        out = np.empty((n, k), np.int64)
        shift = top - np.arange(k)  # complement rank r maps to index r + #{j: top_j - j <= r}
        for i in range(n):
            t_pos = win[i][from_t[i]]
            nr = k - t_pos.size
            out[i, : t_pos.size] = top[i, t_pos]
            if nr:
                r = rng.choice(m, size=nr, replace=False)
                out[i, t_pos.size :] = r + np.searchsorted(shift[i], r, side="right")
        return out

    def _encode(self, x, *, step, total_rounds, training):
        n = x.shape[0]
        x2 = x.reshape(n, -1)
        d = x2.shape[1]
        check_finite(x2.min(), x2.max())
        idx = self.select(x2, training)
        k = idx.shape[1]
        vals = np.take_along_axis(x2, idx, axis=1)
        b = bitpack.index_bits(d)
        params = np.array([k], "<u4").tobytes() + bytes([b])
        return params, [vals.astype("<f4"), bitpack.pack_wide(idx, b)]

    @classmethod
    def _decode(cls, h: fmt.Header):
        k, b = read_struct(h, "IB")
        n = h.shape[0]
        d = prod(h.shape[1:])
        if not 1 <= k <= d:
            raise fmt.PayloadError(f"randtopk payload: k = {k} outside 1..{d}")
        if b != bitpack.index_bits(d):
            raise fmt.PayloadError(f"randtopk payload: index width {b}, expected {bitpack.index_bits(d)} for d = {d}")
        expect_sections(h, [4 * n * k, bitpack.packed_size(n * k, b)])
        vals = f32(h.sections[0], n * k, "randtopk values").reshape(n, k)
        idx = bitpack.unpack_wide(h.sections[1], b, n * k).reshape(n, k).astype(np.int64)
        if idx.size and idx.max() >= d:
            raise fmt.PayloadError(f"randtopk payload: index {int(idx.max())} >= d = {d}")
        if k > 1 and (np.diff(idx, axis=1) <= 0).any():
            raise fmt.PayloadError("randtopk payload: indices not strictly increasing within a sample")
        out = np.zeros((n, d), np.float32)
        np.put_along_axis(out, idx, vals, axis=1)
        mask = np.zeros((n, d), bool)
        np.put_along_axis(mask, idx, True, axis=1)
        return out.reshape(h.shape), {"mask": mask.reshape(h.shape), "indices": idx, "k": k}

    def backward(self, grad, meta):
        g = check_grad(grad, meta)
        return np.where(meta["mask"], g, np.float32(0.0))

    def error_bound(self, x, meta=None):
        if meta is None:
            return None
        x = np.asarray(x, np.float32)
        rest = np.abs(x[~meta["mask"]])
        return float(rest.max()) if rest.size else 0.0
