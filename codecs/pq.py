"""``pq``: product quantization ([30] in sgq.md, Stock et al.) of the stripes, the channel-agnostic baseline.

The C channels are split into G successive near-equal subsets (``np.array_split``: the
first C mod G subsets get one more channel); in each subset every sub-stripe
x = X[n, subset, s] is replaced by the nearest of 2^n centroids (K-means, Eq. 1-6 of
sgq.md with unit weights -- no significance weighting, no regrouping, no gradient
calibration).  The fit uses the same engine and defaults as ``sgq`` (``sample`` stripes,
``iters`` Lloyd iterations, optional warm start: the shared engine of vq.py) so the two differ only in what the
paper says they differ in.

Traffic: the same as SGQ's Eq. 8, sum_g (n N S + 32 * 2^n * C_g) bits.

Payload (codec version 1):

    params   u8 n, u16 G                                                   (P = 3)
    sec 0    u16[G]     C_g
    sec 1    f32        codebooks, subset by subset, (2^n, C_g) row-major
    sec 2    packed     n-bit indices, subset by subset, each N*S in (n, s) order, one stream

    bytes = 36 + 3 + 12 + 2 G + 4 * 2^n * C + ceil(G n N S / 8)

meta from decode_with_meta: ``group_sizes``, ``codebooks``, ``labels`` (G, N, S), ``bits``.
backward: identity (straight-through estimator).
"""

from __future__ import annotations

import numpy as np

from . import bitpack
from . import format as fmt
from .base import Codec, Param, as3, bits_param, expect_sections, prod, read_struct, seed_param
from .registry import register
from .vq import (
    checked_means,
    fit_groups,
    group_sizes,
    padded_index,
    parse_books_codes,
    parse_groups,
    vq_reconstruct,
)


@register("pq", wire_id=6)
class PQ(Codec):
    PARAMS = {
        "bits": bits_param(4),
        "groups": Param(10, int, 1, 65535, doc="G successive channel subsets (fewer if C < G)"),
        "sample": Param(512, int, 16, 1 << 26, doc="stripes sampled for the K-means fit"),
        "iters": Param(4, int, 1, 1000, doc="Lloyd iterations"),
        "warm_start": Param(True, bool, doc="seed K-means with the previous training encode's centroids"),
        "seed": seed_param(),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._rng = np.random.default_rng(self._p["seed"])
        self._warm: tuple[np.ndarray, np.ndarray] | None = None

    def _encode(self, x, *, step, total_rounds, training):
        x3 = as3(x)
        n, c, s = x3.shape
        if c > 65535:
            raise ValueError(f"pq: at most 65535 channels, got {c}")
        means = checked_means(x3)
        bits = self._p["bits"]
        sizes = group_sizes(c, min(self._p["groups"], c))
        idx, valid = padded_index(np.arange(c), sizes)
        wpad = valid.astype(np.float32)
        warm = None
        if self._p["warm_start"] and self._warm is not None:
            pidx, pU = self._warm
            if pidx.shape == idx.shape and (pidx == idx).all() and pU.shape[1] == (1 << bits):
                warm = pU
        U, labels, books = fit_groups(self, x3, idx, wpad, sizes, bits, warm, means, training)
        params = np.array([bits], "<u1").tobytes() + np.array([sizes.size], "<u2").tobytes()
        return params, [sizes.astype("<u2"), books.astype("<f4"), bitpack.pack(labels, bits, check=False)]

    @classmethod
    def _decode(cls, h: fmt.Header):
        bits, g = read_struct(h, "BH")
        if not 1 <= bits <= 8:
            raise fmt.PayloadError(f"pq payload: bit width {bits} outside 1..8")
        shape = h.shape
        n, c = shape[0], shape[1]
        s = prod(shape[2:])
        expect_sections(h, [2 * g, None, None])
        perm, sizes = parse_groups(h, None, h.sections[0], c, g)
        books, labels = parse_books_codes(h, h.sections[1], h.sections[2], sizes, bits, n, s)
        out = vq_reconstruct(shape, perm, sizes, books, labels)
        return out, {"bits": bits, "group_sizes": sizes, "codebooks": books, "labels": labels}
