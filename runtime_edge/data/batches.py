"""Batches: a seeded order per epoch that can start at any batch, so an interrupted edge resumes exactly.

:func:`batches` shuffles a shard with ``default_rng([seed, epoch])`` and can
start at any batch (``start_batch``): an edge killed mid-epoch and restarted
with the same arguments continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .partition import check_int
from .spec import Dataset

__all__ = ["batches", "epoch_order", "eval_batches", "num_batches"]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch over ``n`` samples."""
    n = check_int("n", n, 0)
    b = check_int("batch_size", batch_size, 1)
    return n // b if drop_last else -(-n // b)


def epoch_order(indices: np.ndarray | Sequence[int], *, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits ``indices``: a ``default_rng([seed, epoch])`` permutation."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    rng = np.random.default_rng([check_int("seed", seed, 0), check_int("epoch", epoch, 0)])
    return idx[rng.permutation(idx.shape[0])]


def batches(
    dataset: Dataset,
    indices: np.ndarray | Sequence[int] | None,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = True,
    start_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Training batches ``(x float32 (B, C, H, W), y int64 (B,))`` of one epoch over ``indices``.

    The order is :func:`epoch_order` (``indices=None``: the whole dataset);
    batch ``j`` is ``order[j * batch_size : (j + 1) * batch_size]``.
    ``start_batch=j`` yields batches ``j, j + 1, ...`` of that same epoch,
    identical to the tail of a full run: an edge restarted after finishing
    ``j`` batches passes ``start_batch=j`` to continue where it stopped.
    ``drop_last`` drops the final short batch.
    """
    n = len(dataset)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"indices must lie in 0..{n - 1}, got {int(idx.min())}..{int(idx.max())}")
    total = num_batches(int(idx.shape[0]), batch_size, drop_last)
    start = check_int("start_batch", start_batch, 0)
    if start > total:
        raise ValueError(f"start_batch must lie in 0..{total} (batches this epoch), got {start}")
    order = epoch_order(idx, seed=seed, epoch=epoch)
    return _yield_batches(dataset, order, batch_size, start, total)


def _yield_batches(
    ds: Dataset, order: np.ndarray, b: int, start: int, total: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for j in range(start, total):
        sel = order[j * b : (j + 1) * b]
        yield ds.images[sel], ds.labels[sel]


def eval_batches(
    dataset: Dataset, batch_size: int, *, indices: np.ndarray | Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Evaluation batches in fixed order (``indices`` as given, default all), the last one possibly short."""
    n = len(dataset)
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n)):
        raise ValueError(f"indices must be 1-D and lie in 0..{n - 1}")
    total = num_batches(int(idx.shape[0]), batch_size, drop_last=False)
    return _yield_batches(dataset, idx, batch_size, 0, total)
