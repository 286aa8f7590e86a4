"""Seeded numpy Lloyd K-means with per-feature distance weights, batched over independent problems.

Objective (sgq.md Eq. 1 with the channel weights of Eq. 11, read per feature):

    J = sum_i sum_j r_ij sum_c v_c (x_ic - u_jc)^2,       r_ij = 1 if x_i is in cluster j (Eq. 2)
    y_i = argmin_j sum_c v_c (x_ic - u_jc)^2                                            (Eq. 3)
    u_j = sum_i r_ij x_i / sum_i r_ij                                                   (Eq. 4)

Per-feature weights ``v_c >= 0`` do not change the centroid update (the weighted mean
over features is still the plain mean of the members), only the assignment.

Distances use the matmul trick: ``||x - u_j||_v^2 = ||u_j||_v^2 - 2 x.(v*u_j) + ||x||_v^2``;
with points augmented to ``[x; 1; ||x||_v^2]`` and centroids to ``[-2 v*u; ||u||_v^2; 1]``
one small matrix product gives every distance, and the argmin is an integer min
(:func:`nearest`).  Layout is features-first, ``(G, d, m)``: the distance array is
``(G, k, m)`` and the min over ``k`` is a fast reduction over a middle axis.
``G`` independent problems (SGQ's channel groups, padded to a common ``d`` with zero
weight on the padding) run in the same numpy calls.

Initialisation: k-means++ (D^2 sampling with the seeded generator), or given centroids
(warm start), or random distinct points.  Ties in the assignment go to the lowest
index; empty clusters are re-seeded at the points farthest from their centroids.
"""

from __future__ import annotations

from typing import cast

import numpy as np


def augment(X: np.ndarray, w: np.ndarray | None, out: np.ndarray | None = None, ones: bool = True) -> np.ndarray:
    """Points X ``(..., G, d, m)`` -> ``(..., G, d+2, m)`` with rows [x; 1; ||x||_w^2] (see :func:`nearest`).

    With ``out`` given, ``X`` must be the view ``out[..., :d, :]`` (filled in place, no copy);
    ``ones=False`` leaves the row of ones as it is (already set).
    """
    *lead, G, d, m = X.shape
    if out is None:
        out = np.empty((*lead, G, d + 2, m), np.float32)
        out[..., :d, :] = X
        ones = True
    if ones:
        out[..., d, :] = 1.0
    sq = np.square(out[..., :d, :])
    ww = np.ones((G, d), np.float32) if w is None else np.asarray(w, np.float32)
    out[..., d + 1, :] = np.matmul(ww[:, None, :], sq)[..., 0, :]
    return out


def centroid_rows(U: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Centroids U ``(G, k, d)`` -> ``(G, k, d+2)`` rows [-2 w*u, ||u||_w^2, 1]."""
    G, k, d = U.shape
    wu = U if w is None else U * w[:, None, :]
    Ua = np.empty((G, k, d + 2), np.float32)
    Ua[:, :, :d] = wu * np.float32(-2.0)
    Ua[:, :, d] = np.einsum("gkd,gkd->gk", wu, U)
    Ua[:, :, d + 1] = 1.0
    return Ua


_IDX_CACHE: dict[tuple, np.ndarray] = {}


def _index_plane(shape: tuple, k: int) -> np.ndarray:
    """int32 array of ``shape`` (..., k, m) holding the centroid index (cached: an unbroadcast OR is faster)."""
    a = _IDX_CACHE.get(shape)
    if a is None:
        if len(_IDX_CACHE) > 16:
            _IDX_CACHE.clear()
        a = np.ascontiguousarray(np.broadcast_to(np.arange(k, dtype=np.int32).reshape(k, 1), shape))
        a.flags.writeable = False
        _IDX_CACHE[shape] = a
    return a


def nearest(Ua: np.ndarray, Xa: np.ndarray, packed: bool = False):
    """Eq. 3 for augmented points/centroids: labels uint8 ``(..., G, m)``.

    One matrix product gives every squared distance ``||u||^2 - 2 x.u + ||x||^2`` (>= 0 up to
    rounding).  The argmin over the k centroids is then one integer min: the centroid
    index replaces the low ``ceil(log2 k)`` mantissa bits of each non-negative float32
    distance (viewed as int32, whose order is the float order), so the minimum carries
    its own index.  Distances equal to within a relative 2^-(23 - log2 k) count as ties
    (broken towards the lower index).  ``packed=True`` returns (labels, squared distance to
    the nearest centroid, the packed int32 distances, their minimum); ``si == min`` is then
    an exact one-hot.
    """
    k = Ua.shape[-2]
    nb = max(1, (k - 1).bit_length())
    low = np.int32((1 << nb) - 1)
    s = np.matmul(Ua, Xa)  # (..., G, k, m)
    si = s.view(np.int32)
    np.bitwise_and(si, ~low, out=si)
    np.bitwise_or(si, _index_plane(si.shape, k), out=si)
    mn = si.min(axis=-2)
    lab = (mn & low).astype(np.uint8)
    if packed:
        return lab, (mn & ~low).view(np.float32), si, mn
    return lab


def lloyd(
    Xa: np.ndarray,
    U: np.ndarray,
    w: np.ndarray | None = None,
    iters: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations on augmented points Xa ``(G, d+2, m)`` from centroids U ``(G, k, d)``.

    Returns (U, labels ``(G, m)`` uint8).  Stops early when no label changes.  Empty
    clusters are re-seeded at the points farthest from their centroids, which also
    separates duplicated seeds (e.g. several seeds on the all-zero stripe of ReLU
    features) and replaces stale warm-start centroids that no point uses any more.
    """
    G, d2, m = Xa.shape
    d = d2 - 2
    U = U.astype(np.float32, copy=True)
    XT1 = np.ascontiguousarray(Xa[:, : d + 1, :].transpose(0, 2, 1))  # [x, 1]: sums and counts in one product
    prev = None
    lab = None
    for _ in range(max(1, iters)):
        lab, dist, si, mn = nearest(centroid_rows(U, w), Xa, packed=True)
        if prev is not None and np.array_equal(lab, prev):
            break
        oh = np.empty(si.shape, np.float32)
        np.equal(si, mn[:, None, :], out=oh, casting="unsafe")  # exact one-hot: indices are in the bits
        sums = np.matmul(oh, XT1)
        cnt = sums[:, :, d]
        nz = cnt > 0
        U = np.where(nz[:, :, None], sums[:, :, :d] / np.maximum(cnt, 1)[:, :, None], U).astype(np.float32)
        prev = lab
        if not nz.all():
            # re-seed every empty cluster at the points farthest from their centroids
            ge, ke = np.nonzero(~nz)
            rank = np.arange(ge.size) - np.searchsorted(ge, ge)  # 0, 1, ... within each group
            top = min(m, int(rank.max()) + 1)
            far = np.argpartition(-dist, top - 1, axis=1)[:, :top] if top < m else np.argsort(-dist, axis=1)
            U[ge, ke, :] = Xa[ge, :d, far[ge, np.minimum(rank, top - 1)]]
            prev = None  # labels no longer match U
    assert lab is not None  # the loop above runs at least once
    return U, lab


def kmeanspp(X: np.ndarray, k: int, w: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) for each of the G problems of X ``(G, d, m)``; returns U ``(G, k, d)``."""
    G, d, m = X.shape
    U = np.empty((G, k, d), np.float32)
    gi = np.arange(G)
    idx = cast(np.ndarray, rng.integers(0, m, size=G))  # size= gives an array
    U[:, 0, :] = X[gi, :, idx]
    ww = np.ones((G, d), np.float32) if w is None else np.asarray(w, np.float32)
    D = None
    for j in range(1, k):
        diff = X - U[:, j - 1, :, None]
        diff *= diff
        dj = np.einsum("gdm,gd->gm", diff, ww)
        D = dj if D is None else np.minimum(D, dj, out=D)
        cum = np.cumsum(D, axis=1, dtype=np.float64)
        tot = cum[:, -1]
        r = rng.random(G) * tot
        idx = (cum < r[:, None]).sum(axis=1)
        idx = np.where(tot > 0, np.minimum(idx, m - 1), rng.integers(0, m, size=G))
        U[:, j, :] = X[gi, :, idx]
    return U


def fit(
    X: np.ndarray,
    k: int,
    *,
    weights: np.ndarray | None = None,
    iters: int = 10,
    rng: np.random.Generator | int | None = 0,
    sample: int | None = None,
    init: np.ndarray | str = "k-means++",
) -> np.ndarray:
    """Fits k centroids to points X ``(m, d)`` (rows are points); returns U ``(k, d)`` float32.

    ``sample``: fit on that many rows drawn without replacement (all rows if None or >= m);
    ``weights``: per-feature distance weights ``(d,)``; ``init``: "k-means++", "random" or
    an array of initial centroids.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X must be (m, d) with m >= 1, got shape {X.shape}")
    if sample is not None and sample < X.shape[0]:
        X = X[np.sort(rng.choice(X.shape[0], size=sample, replace=False))]
    Xg = np.ascontiguousarray(X.T)[None]
    w = None if weights is None else np.asarray(weights, np.float32)[None]
    if isinstance(init, str):
        if init == "k-means++":
            U0 = kmeanspp(Xg, k, w, rng)
        elif init == "random":
            U0 = X[rng.choice(X.shape[0], size=k, replace=X.shape[0] < k)][None]
        else:
            raise ValueError(f"init must be 'k-means++', 'random' or an array, got {init!r}")
    else:
        U0 = np.asarray(init, np.float32)[None]
    U, _ = lloyd(augment(Xg, w), U0, w, iters)
    return U[0]


def assign(X: np.ndarray, U: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Nearest centroid (Eq. 3, weighted) of every row of X ``(m, d)``; returns int64 labels ``(m,)``."""
    X = np.asarray(X, np.float32)
    w = None if weights is None else np.asarray(weights, np.float32)[None]
    lab = nearest(centroid_rows(np.asarray(U, np.float32)[None], w), augment(np.ascontiguousarray(X.T)[None], w))
    return lab[0].astype(np.int64)


def inertia(X: np.ndarray, U: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Eq. 1 (weighted): sum of squared distances of every row to its nearest centroid, in float64."""
    X = np.asarray(X, np.float64)
    U = np.asarray(U, np.float64)
    w = np.ones(X.shape[1]) if weights is None else np.asarray(weights, np.float64)
    d = ((X[:, None, :] - U[None, :, :]) ** 2 * w).sum(-1)
    return float(d.min(axis=1).sum())
