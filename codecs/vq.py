"""Stripe vector quantization shared by ``sgq`` and ``pq``: grouping, weighted K-means fit and
assignment of the stripes of each channel group, and the payload helpers both read.

A *stripe* is the vector X[n, channels of a group, s] of an (N, C, S) tensor.  Both codecs
cut the C channels into G groups of near-equal size (:func:`group_sizes`), pad them to a
common width (:func:`padded_index`), fit 2^n centroids per group on a sample of stripes and
assign every stripe to its nearest one (:func:`stripe_vq`, on :mod:`splitedge.codecs.kmeans`);
their payloads store the codebooks and the bit-packed indices the same way
(:func:`parse_books_codes`, :func:`vq_reconstruct`).  sgq.py documents the equations.
"""

from __future__ import annotations

import numpy as np

from . import bitpack, kmeans
from . import format as fmt
from .base import check_finite, f32, prod

_ASSIGN_BLOCK = 1 << 18  # distance-array elements per assignment block (1 MiB)
_EVAL_STREAM = 0x65766131  # with the seed, the generator of evaluation encodes (fit_groups)


# ====================================================================== stripe VQ engine


def group_sizes(c: int, g: int) -> np.ndarray:
    """np.array_split sizes: C channels into G near-equal contiguous groups."""
    base, extra = divmod(c, g)
    return np.array([base + (1 if i < extra else 0) for i in range(g)], np.int64)


def padded_index(perm: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, dmax) channel index (padding repeats the group's first channel) and its validity mask."""
    g = sizes.size
    dmax = int(sizes.max())
    idx = np.empty((g, dmax), np.int64)
    valid = np.zeros((g, dmax), bool)
    off = 0
    for i, sz in enumerate(sizes):
        sz = int(sz)
        idx[i, :sz] = perm[off : off + sz]
        idx[i, sz:] = perm[off]
        valid[i, :sz] = True
        off += sz
    return idx, valid


def stripe_vq(
    x3: np.ndarray,
    idx: np.ndarray,
    wpad: np.ndarray,
    bits: int,
    rng: np.random.Generator,
    iters: int,
    sample: int,
    warm: np.ndarray | None = None,
    means: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fits and assigns every group; returns (U (G, k, dmax), labels (G, N, S) uint8).

    Distances are computed on data centred per channel (``means``: (N, C) per-sample
    channel means, averaged here), so the matmul form of the distance does not cancel
    catastrophically for data with a large offset; the codebook is returned uncentred.
    """
    n, c, s = x3.shape
    g, dmax = idx.shape
    k = 1 << bits
    m = n * s
    mu_c = (means if means is not None else x3.mean(axis=2)).mean(axis=0, dtype=np.float64).astype(np.float32)
    mu = mu_c[idx][:, :, None]  # (G, dmax, 1)
    # group-major stripes, centred and augmented for kmeans.nearest: (G, dmax + 2, N*S), one
    # gather; the ||x||_w^2 row is computed block by block where it is used, while in cache
    xa = np.empty((g, dmax + 2, m), np.float32)
    np.subtract(x3.transpose(1, 0, 2)[idx.reshape(-1)].reshape(g, dmax, m), mu, out=xa[:, :dmax])
    xa[:, dmax] = 1.0
    if m <= sample:
        Xs = kmeans.augment(xa[:, :dmax], wpad, out=xa, ones=False)
    else:
        Xs = np.take(xa, np.sort(rng.integers(0, m, size=sample)), axis=2)
        kmeans.augment(Xs[:, :dmax], wpad, out=Xs, ones=False)
    ms = Xs.shape[2]
    pick = rng.choice(ms, size=k, replace=ms < k)
    U0 = np.ascontiguousarray(Xs[:, :dmax, pick].transpose(0, 2, 1))
    if warm is not None:
        use = ~np.isnan(warm[:, 0, 0])
        U0[use] = warm[use] - mu.transpose(0, 2, 1)[use]
    U, _ = kmeans.lloyd(Xs, U0, wpad, iters)
    # assign every stripe (Eq. 3), block by block of stripes: labels come out in payload order
    Ua = kmeans.centroid_rows(U, wpad)
    labels = np.empty((g, m), np.uint8)
    step = max(1, _ASSIGN_BLOCK // (g * k))
    for a in range(0, m, step):
        b = min(m, a + step)
        blk = xa[:, :, a:b]
        if Xs is not xa:
            kmeans.augment(blk[:, :dmax], wpad, out=blk, ones=False)
        labels[:, a:b] = kmeans.nearest(Ua, blk)
    U += mu.transpose(0, 2, 1)
    return U, labels.reshape(g, n, s)


def fit_groups(codec, x3, idx, wpad, sizes, bits, warm, means, training):
    """stripe_vq with the codec's settings, the overflow check, and the warm-start state kept for
    the next encode. Returns (U, labels, flat codebooks).

    Training batches draw from the codec's generator and keep their centroids; an evaluation batch
    (``training=False``) changes no state: it draws from a generator made afresh from the seed (the
    same draws for every evaluation call) and only reads the warm start."""
    rng = codec._rng if training else np.random.default_rng([codec._p["seed"], _EVAL_STREAM])
    with np.errstate(over="raise"):
        try:
            U, labels = stripe_vq(x3, idx, wpad, bits, rng, codec._p["iters"], codec._p["sample"], warm, means)
        except FloatingPointError:
            raise ValueError("input values too large: squared distances overflow float32") from None
    check_codebooks(U)
    if training:
        codec._warm = (idx, U)
    books = np.concatenate([U[i, :, : int(sz)].reshape(-1) for i, sz in enumerate(sizes)])
    return U, labels, books


def checked_means(x3: np.ndarray) -> np.ndarray:
    """Channel means per sample (N, C), one pass; doubles as the NaN/Inf check of the input."""
    p = x3 @ np.full(x3.shape[2], 1.0 / x3.shape[2], np.float32)
    if not np.isfinite(p).all():
        check_finite(x3.min(), x3.max())
        raise ValueError("input values too large: their sums overflow float32")
    return p


def check_codebooks(U: np.ndarray) -> None:
    if not np.isfinite(U).all():
        raise ValueError("input values too large: squared distances overflow float32")


def vq_reconstruct(shape, perm, sizes, books, labels) -> np.ndarray:
    n, c = shape[0], shape[1]
    s = prod(shape[2:])
    out = np.empty((n, c, s), np.float32)
    off = 0
    for i, sz in enumerate(sizes):
        sz = int(sz)
        ch = perm[off : off + sz]
        off += sz
        vals = np.take(books[i].T, labels[i], axis=1)  # (C_g, N, S)
        out[:, ch, :] = vals.transpose(1, 0, 2)
    return out.reshape(shape)


def parse_groups(h: fmt.Header, perm_sec, sizes_sec, c: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    if g < 1 or g > c:
        raise fmt.PayloadError(f"{h.codec_name} payload: {g} groups for {c} channels")
    sizes = np.frombuffer(sizes_sec, "<u2").astype(np.int64)
    if sizes.min() < 1 or sizes.sum() != c:
        raise fmt.PayloadError(f"{h.codec_name} payload: group sizes {sizes.tolist()} do not split {c} channels")
    if perm_sec is None:
        return np.arange(c), sizes
    perm = np.frombuffer(perm_sec, "<u2").astype(np.int64)
    if perm.max() >= c or not (np.bincount(perm, minlength=c) == 1).all():
        raise fmt.PayloadError(f"{h.codec_name} payload: channel order is not a permutation of {c} channels")
    return perm, sizes


def parse_books_codes(h: fmt.Header, books_sec, codes_sec, sizes, bits: int, n: int, s: int):
    k = 1 << bits
    c = int(sizes.sum())
    flat = f32(books_sec, k * c, f"{h.codec_name} codebooks")
    books = []
    off = 0
    for sz in sizes:
        sz = int(sz)
        books.append(flat[off : off + k * sz].reshape(k, sz).copy())
        off += k * sz
    g = sizes.size
    need = bitpack.packed_size(g * n * s, bits)
    if codes_sec.nbytes != need:
        raise fmt.PayloadError(f"{h.codec_name} payload: code section has {codes_sec.nbytes} bytes, expected {need}")
    labels = bitpack.unpack(codes_sec, bits, g * n * s).reshape(g, n, s)
    return books, labels
