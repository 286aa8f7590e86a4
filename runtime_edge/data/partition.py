"""Partitioning a training set across clients: ``iid`` or ``dirichlet:ALPHA`` (label skew).

:func:`partition` is a pure function of ``(labels, num_clients, scheme, seed)``:
every client computes the whole partition and keeps its own shard, so clients
that never talk to each other get disjoint shards that cover the dataset.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DIRICHLET_MAX_DRAWS",
    "DIRICHLET_MIN_SIZE",
    "PARTITION_SCHEMES",
    "check_int",
    "parse_scheme",
    "partition",
    "partition_all",
    "partition_fingerprint",
]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet:ALPHA")
DIRICHLET_MIN_SIZE = 10
DIRICHLET_MAX_DRAWS = 100


def parse_scheme(scheme: str) -> tuple[str, float]:
    """``iid`` -> ("iid", 0); ``dirichlet:ALPHA`` -> ("dirichlet", ALPHA). ValueError names the accepted forms."""
    if not isinstance(scheme, str):
        raise ValueError(f"scheme must be a string, one of {', '.join(PARTITION_SCHEMES)}; got {scheme!r}")
    if scheme == "iid":
        return "iid", 0.0
    kind, sep, value = scheme.partition(":")
    if kind == "dirichlet" and sep:
        try:
            alpha = float(value)
        except ValueError:
            raise ValueError(f"scheme {scheme!r}: ALPHA must be a number, e.g. dirichlet:0.5") from None
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"scheme {scheme!r}: ALPHA must be finite and > 0, got {alpha}")
        return "dirichlet", alpha
    raise ValueError(
        f"unknown partition scheme {scheme!r}; accepted: "
        f"{', '.join(PARTITION_SCHEMES)} (e.g. dirichlet:0.5)"
    )


def check_int(name: str, value: object, lo: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def partition_all(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    scheme: str,
    seed: int,
    *,
    min_size: int | None = None,
) -> list[np.ndarray]:
    """Every client's shard (ascending int64 indices into ``labels``); see :func:`partition`."""
    y = np.asarray(labels)
    if y.ndim != 1 or not (y.size == 0 or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    k = check_int("num_clients", num_clients, 1)
    seed = check_int("seed", seed, 0)
    kind, alpha = parse_scheme(scheme)
    n = int(y.shape[0])
    m = check_int("min_size", min_size, 0) if min_size is not None else (1 if kind == "iid" else DIRICHLET_MIN_SIZE)
    if n < k * m:
        raise ValueError(
            f"cannot give each of {k} clients at least min_size={m} of {n} samples; "
            "use fewer clients or a smaller min_size"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(s).astype(np.int64) for s in np.array_split(rng.permutation(n), k)]
    return _dirichlet(y, k, alpha, m, rng)


def _dirichlet(y: np.ndarray, k: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, shares ~ Dir(alpha * 1_k) cut the class's shuffled samples among the clients.

    The construction of Yurochkin et al. 2019 / Wang et al. 2020 as NIID-Bench
    (Li et al. 2022) implements it, including its balancing step: a client that
    already holds more than n / k samples gets no share of later classes. The
    whole draw is repeated (same generator, continuing) until every client has
    ``min_size`` samples, at most ``DIRICHLET_MAX_DRAWS`` times; if no draw
    succeeds, the last one is rebalanced: the largest shard gives random samples
    to the smallest until every client has ``min_size``.
    """
    n = int(y.shape[0])
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    shards: list[list[np.ndarray]] = []
    sizes = np.zeros(k, dtype=np.int64)
    for _ in range(DIRICHLET_MAX_DRAWS):
        shards = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for idx in members:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, alpha))
            p = np.where(np.isfinite(p), p, 0.0) * (sizes < n / k)
            if p.sum() <= 0:  # tiny alpha can underflow every open client's share to 0
                p = (sizes < n / k).astype(np.float64)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for j, part in enumerate(np.split(idx, cuts)):
                shards[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_size:
            break
    out = [np.concatenate(s) if s else np.empty(0, dtype=np.int64) for s in shards]
    while sizes.min() < min_size:
        small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
        give = int(min(min_size - sizes[small], sizes[big] - min_size))
        pick = rng.permutation(len(out[big]))
        out[small] = np.concatenate([out[small], out[big][pick[:give]]])
        out[big] = out[big][pick[give:]]
        sizes[small] += give
        sizes[big] -= give
    return [np.sort(s).astype(np.int64) for s in out]


def partition(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    client_id: int,
    scheme: str,
    seed: int,
    *,
    min_size: int | None = None,
) -> np.ndarray:
    """The shard of client ``client_id``: ascending int64 indices into ``labels``.

    ``scheme``: ``iid`` (a ``default_rng(seed)`` permutation cut into
    ``num_clients`` near-equal contiguous pieces, sizes differing by at most
    one) or ``dirichlet:ALPHA`` (non-IID label skew, see :func:`_dirichlet`;
    smaller ALPHA, more skew). A pure function of its arguments: clients that
    each compute their own shard with the same seed get disjoint shards that
    together cover every index. ``min_size`` (default 1 for iid, 10 for
    dirichlet) is the least number of samples any client gets; a ValueError if
    ``len(labels) < num_clients * min_size``.
    """
    k = check_int("num_clients", num_clients, 1)
    cid = check_int("client_id", client_id, 0)
    if cid >= k:
        raise ValueError(f"client_id must lie in 0..{k - 1} for num_clients={k}, got {cid}")
    return partition_all(labels, k, scheme, seed, min_size=min_size)[cid]


def partition_fingerprint(
    labels: np.ndarray | Sequence[int], shards: Sequence[np.ndarray], scheme: str, seed: int
) -> dict[str, str]:
    """What an edge tells the cloud about the partition it computed, so that edges whose shards
    would silently overlap are caught (e.g. numpy versions whose random streams differ).

    ``plan``: sha256 of the inputs (labels, scheme, seed, number of clients); ``digest``: sha256
    of every shard. Edges with equal plans must have equal digests. Hex strings, 32 characters.
    """
    y = np.ascontiguousarray(np.asarray(labels), "<i8")
    plan = hashlib.sha256(f"{scheme}|{int(seed)}|{len(shards)}|{y.size}|".encode())
    plan.update(y.tobytes())
    digest = hashlib.sha256()
    for sh in shards:
        a = np.ascontiguousarray(sh, "<i8")
        digest.update(np.int64(a.size).astype("<i8").tobytes())
        digest.update(a.tobytes())
    return {"plan": plan.hexdigest()[:32], "digest": digest.hexdigest()[:32], "numpy": np.__version__}
