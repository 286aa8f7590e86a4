"""``synthetic``: a small learnable dataset generated from a seed (no files)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .spec import Dataset, DatasetError, Normalization

__all__ = ["SYNTHETIC_MAX_BYTES", "load_synthetic"]

SYNTHETIC_MAX_BYTES = 1 << 31
"""The most float32 image bytes one split may hold (2 GiB): larger ``n=``/``test=`` are refused up front."""
_MAX_SAMPLE_ELEMENTS = 1 << 20  # C * H * W


def load_synthetic(params: Mapping[str, str], split: str) -> Dataset:
    """Class prototypes (smooth random patterns, unit variance) plus Gaussian noise.

    ``n`` train samples (default 2048), ``test`` test samples (default n // 4),
    ``classes`` (10), ``shape`` CxHxW (1x28x28), ``seed`` (0), ``noise`` std (1.0).
    Both splits share the prototypes (``default_rng([seed, 0])``); samples come
    from ``default_rng([seed, 1])`` (train) and ``default_rng([seed, 2])`` (test).
    Labels are balanced (``i % classes``, shuffled). Already standardized.
    Each split's images must fit in :data:`SYNTHETIC_MAX_BYTES`; both splits are
    checked whichever is loaded, so a spec is accepted or refused as a whole.
    """

    def integer(key: str, default: int, lo: int) -> int:
        v = params.get(key)
        if v is None:
            return default
        try:
            out = int(v)
        except ValueError:
            raise DatasetError(f"synthetic parameter {key}={v!r} must be an integer") from None
        if out < lo:
            raise DatasetError(f"synthetic parameter {key}={out} must be >= {lo}")
        return out

    n = integer("n", 2048, 1)
    n_test = integer("test", max(n // 4, 1), 1)
    k = integer("classes", 10, 2)
    seed = integer("seed", 0, 0)
    try:
        noise = float(params.get("noise", "1.0"))
    except ValueError:
        raise DatasetError(f"synthetic parameter noise={params.get('noise')!r} must be a number") from None
    if not (noise >= 0 and math.isfinite(noise)):
        raise DatasetError(f"synthetic parameter noise={noise} must be finite and >= 0")
    shape_s = params.get("shape", "1x28x28")
    try:
        c, h, w = (int(v) for v in shape_s.lower().split("x"))
    except ValueError:
        raise DatasetError(f"synthetic parameter shape={shape_s!r} must be CxHxW, e.g. 3x32x32") from None
    if min(c, h, w) < 1 or c * h * w > _MAX_SAMPLE_ELEMENTS:
        raise DatasetError(f"synthetic parameter shape={shape_s!r} out of range")
    sample_bytes = 4 * c * h * w
    max_count = SYNTHETIC_MAX_BYTES // sample_bytes
    for key, value in (("n", n), ("test", n_test)):
        if value > max_count:
            raise DatasetError(
                f"synthetic parameter {key}={value} is too large: {value} samples of {c}x{h}x{w} float32 need "
                f"{value * sample_bytes} bytes, over the limit of {SYNTHETIC_MAX_BYTES} bytes "
                f"({max_count} samples of this shape) per split"
            )
    count = n if split == "train" else n_test
    proto_rng = np.random.default_rng([seed, 0])
    ch, cw = max(1, -(-h // 4)), max(1, -(-w // 4))  # coarse grid, upsampled 4x: blobs a conv layer sees
    coarse = proto_rng.standard_normal((k, c, ch, cw), dtype=np.float32)
    protos = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :h, :w]
    protos = (protos - protos.mean(axis=(1, 2, 3), keepdims=True)) / (protos.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    labels = rng.permutation(np.arange(count, dtype=np.int64) % k)
    x = rng.standard_normal((count, c, h, w), dtype=np.float32)
    x *= np.float32(noise)
    x += protos[labels]
    name = f"synthetic:n={n},test={n_test},classes={k},shape={c}x{h}x{w},seed={seed},noise={noise:g}"
    norm = Normalization((0.0,) * c, (1.0,) * c)
    return Dataset(name, split, x, labels, tuple(str(i) for i in range(k)), norm)
