"""Activation/gradient codecs for split learning: SL-ACC, SGQ and the baselines they compare against.

numpy only (the edge has no torch).  Public API::

    available() -> list[str]
    get(name, **params) -> Codec                       # ValueError naming the allowed values
    codec.encode(x, *, round=None, total_rounds=None, training=True) -> bytes
    decode(blob, *, max_bytes=None) -> np.ndarray      # stateless; PayloadError if malformed
    decode_with_meta(blob, *, max_bytes=None) -> (np.ndarray, dict)
    codec.backward(grad, meta) -> np.ndarray           # the cloud's rule for dL/dQ(X)
    codec.observe_gradient(grad) -> None               # the edge, after receiving the gradient
    codec.name, codec.params                           # get(codec.name, **codec.params) rebuilds it

Every payload is self-describing (:mod:`splitedge.codecs.format` documents the bytes).
One codec object per stream (per client, per direction): SL-ACC's entropy history, SGQ's
significance network and the randomized codecs' generators live in the object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import format as _fmt
from .base import Codec, Param
from .clio import Clio
from .easyquant import EasyQuant
from .format import DEFAULT_MAX_BYTES, PayloadError
from .fp import FP16, FP32
from .powerquant import PowerQuant
from .pq import PQ
from .randtopk import RandTopk
from .sgq import SGQ
from .slacc import SLACC
from .splitfc import SplitFC
from .uq import UQ

__all__ = [
    "Codec",
    "Param",
    "PayloadError",
    "DEFAULT_MAX_BYTES",
    "available",
    "get",
    "codec_class",
    "decode",
    "decode_with_meta",
]

_REGISTRY: dict[str, type[Codec]] = {
    cls.name: cls for cls in (FP32, FP16, UQ, SLACC, SGQ, PQ, PowerQuant, RandTopk, SplitFC, Clio, EasyQuant)
}
assert set(_REGISTRY) == set(_fmt.CODEC_IDS), "every codec needs an explicit id in format.CODEC_IDS"


def available() -> list[str]:
    """Registered codec names, in the order of their wire ids."""
    return sorted(_REGISTRY, key=_fmt.CODEC_IDS.__getitem__)


def codec_class(name: str) -> type[Codec]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(available())}") from None


def get(name: str, **params: Any) -> Codec:
    """A new codec object (one per stream). Unknown names or bad parameters raise ValueError."""
    return codec_class(name)(**params)


def decode_with_meta(blob: bytes, *, max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """Decodes any codec's payload; returns (float32 array, meta for the backward rule).

    meta always holds ``codec`` (name), ``codec_version`` and ``shape``, plus codec-specific
    numpy arrays and plain values (see each codec's docstring).
    """
    h = _fmt.parse(blob, max_bytes=max_bytes)
    cls = _REGISTRY[h.codec_name]
    if h.codec_version not in cls.read_versions:
        raise PayloadError(
            f"unsupported {cls.name} codec version {h.codec_version} (this build reads {list(cls.read_versions)})"
        )
    try:
        arr, meta = cls._decode(h)
    except PayloadError:
        raise
    except (ValueError, IndexError, TypeError, OverflowError, ArithmeticError) as e:
        # a safety net: decoders validate explicitly, this keeps the contract if one misses a case
        raise PayloadError(f"malformed {cls.name} payload: {type(e).__name__}: {e}") from e
    if arr.shape != h.shape or arr.dtype != np.float32:
        raise PayloadError(f"{cls.name} payload decoded to {arr.dtype}{arr.shape}, header says float32{h.shape}")
    meta = {"codec": cls.name, "codec_version": h.codec_version, "shape": h.shape, **meta}
    return arr, meta


def decode(blob: bytes, *, max_bytes: int | None = None) -> np.ndarray:
    """Decodes any codec's payload to a float32 array (stateless)."""
    return decode_with_meta(blob, max_bytes=max_bytes)[0]
