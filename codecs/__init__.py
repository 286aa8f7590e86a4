"""Activation/gradient codecs for split learning: SL-ACC, SGQ and the baselines they compare against.

numpy only (the edge has no torch).  Public API::

    available() -> list[str]
    get(name, **params) -> Codec                       # ValueError naming the allowed values
    codec.encode(x, *, step=None, total_rounds=None, training=True) -> bytes
    decode(blob, *, max_bytes=None) -> np.ndarray      # stateless; PayloadError if malformed
    decode_with_meta(blob, *, max_bytes=None) -> (np.ndarray, Meta)
    codec.backward(grad, meta) -> np.ndarray           # the cloud's rule for dL/dQ(X)
    codec.observe_gradient(grad) -> None               # the edge, after receiving the gradient
    codec.name, codec.params                           # get(codec.name, **codec.params) rebuilds it
    CodecSpec(name, params).build(), CodecSpec.of(codec) # a codec and its settings as one value

Every payload is self-describing (:mod:`splitedge.codecs.format` documents the bytes).
One codec object per stream (per client, per direction): SL-ACC's entropy history, SGQ's
significance network and the randomized codecs' generators live in the object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# importing a codec module registers its codecs (@register carries each one's name and wire id)
from . import clio, easyquant, fp, powerquant, pq, randtopk, sgq, slacc, splitfc, uq  # noqa: F401
from . import format as _fmt
from .base import Codec, Meta, Param
from .format import DEFAULT_MAX_BYTES, PayloadError
from .registry import CODEC_CLASSES, CODEC_IDS, register
from .spec import CodecSpec

__all__ = [
    "Codec",
    "CodecSpec",
    "Meta",
    "Param",
    "PayloadError",
    "DEFAULT_MAX_BYTES",
    "available",
    "get",
    "codec_class",
    "register",
    "decode",
    "decode_with_meta",
]


def available() -> list[str]:
    """Registered codec names, in the order of their wire ids."""
    return sorted(CODEC_CLASSES, key=CODEC_IDS.__getitem__)


def codec_class(name: str) -> type[Codec]:
    try:
        return CODEC_CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(available())}") from None


def get(name: str, **params: Any) -> Codec:
    """A new codec object (one per stream). Unknown names or bad parameters raise ValueError."""
    return codec_class(name)(**params)


def decode_with_meta(blob: bytes, *, max_bytes: int | None = None) -> tuple[np.ndarray, Meta]:
    """Decodes any codec's payload; returns (float32 array, :class:`Meta` for the backward rule).

    Meta has ``codec`` (name), ``codec_version`` and ``shape``, and in ``fields`` the codec's own
    numpy arrays and plain values (see each codec's docstring).  A stream that expects one
    codec decodes with :meth:`Codec.decode_with_meta`, which refuses other codecs' payloads.
    """
    return _decode(blob, max_bytes, None)


def _decode(blob: bytes, max_bytes: int | None, expect: type[Codec] | None) -> tuple[np.ndarray, Meta]:
    h = _fmt.parse(blob, max_bytes=max_bytes)
    cls = CODEC_CLASSES[h.codec_name]
    if expect is not None and h.codec_id != expect.wire_id:
        raise PayloadError(
            f"a {cls.name} payload (codec id {h.codec_id}), but this stream's codec is {expect.name} "
            f"(codec id {expect.wire_id})"
        )
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
    return arr, Meta(cls.name, h.codec_version, h.shape, meta)


def decode(blob: bytes, *, max_bytes: int | None = None) -> np.ndarray:
    """Decodes any codec's payload to a float32 array (stateless)."""
    return _decode(blob, max_bytes, None)[0]
