"""The codec interface, parameter validation, and helpers shared by the codecs.

A codec object is one stream (one client, one direction): codecs with state (SL-ACC's
entropy history, SGQ's significance network, the random generator of the randomized
codecs) keep it in the object.  Decoding is stateless: everything needed is in the
payload (:mod:`splitedge.codecs.format`).

Tensors of rank 2..4 are read as ``(N, C, S...)``: axis 0 is the sample, axis 1 the
channel, the rest spatial; a rank-2 tensor is ``C`` channels of one pixel each.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from . import format as fmt
from .format import PayloadError

@dataclass(frozen=True)
class Param:
    """One codec setting: its default, type and allowed values (validated by :class:`Codec`)."""

    default: Any
    kind: type  # int, float, bool or str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    optional: bool = False  # None allowed
    doc: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            s = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is bool:
            s = "True or False"
        else:
            lo = "-inf" if self.low is None else repr(self.low)
            hi = "inf" if self.high is None else repr(self.high)
            s = f"{'an integer' if self.kind is int else 'a number'} in [{lo}, {hi}]"
        return s + (" or None" if self.optional else "")

    def check(self, codec: str, name: str, value: Any) -> Any:
        bad = ValueError(f"codec {codec!r}: parameter {name!r} must be {self.allowed()}, got {value!r}")
        if value is None:
            if self.optional:
                return None
            raise bad
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise bad
            return bool(value)
        if self.kind is int:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad
            value = int(value)
        elif self.kind is float:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise bad
            value = float(value)
            if not math.isfinite(value):
                raise bad
        elif self.kind is str and not isinstance(value, str):
            raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if self.low is not None and value < self.low:
            raise bad
        if self.high is not None and value > self.high:
            raise bad
        return value


@dataclass(frozen=True, eq=False)
class Meta(Mapping):  # not Mapping[str, Any]: collections.abc generics cannot be subscripted at run time on 3.8
    """What ``decode_with_meta`` returns beside the array, for the codec's ``backward`` and ``error_bound``.

    The typed part every payload has: ``codec`` (name), ``codec_version`` (payload version) and
    ``shape``; ``fields`` holds the codec's own decoded values (read-only; each codec's docstring
    lists them). It reads as a mapping too: ``meta["shape"]``, ``meta["bits"]``.
    """

    codec: str
    codec_version: int
    shape: tuple[int, ...]
    fields: Mapping[str, Any] = field(default_factory=dict)

    _TYPED: ClassVar[tuple[str, ...]] = ("codec", "codec_version", "shape")

    def __post_init__(self) -> None:
        clash = set(self._TYPED) & set(self.fields)
        if clash:
            raise ValueError(f"meta fields may not redefine {sorted(clash)}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def __getitem__(self, key: str) -> Any:
        if key in self._TYPED:
            return getattr(self, key)
        return self.fields[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._TYPED
        yield from self.fields

    def __len__(self) -> int:
        return len(self._TYPED) + len(self.fields)

    def __repr__(self) -> str:
        return f"Meta(codec={self.codec!r}, codec_version={self.codec_version}, shape={self.shape}, fields={sorted(self.fields)})"


def bits_param(default: int = 4, low: int = 1, high: int = 8) -> Param:
    return Param(default, int, low, high, doc="bits per code")


GRIDS = ("zero", "minmax")


def grid_param() -> Param:
    return Param(
        "zero", str, choices=GRIDS,
        doc="quantization grid: 'zero' keeps 0 exact (integer zero point, codec version 2), "
        "'minmax' the min-max grid of codec version 1 (the ablation)",
    )


def seed_param() -> Param:
    return Param(0, int, 0, 2**63 - 1, doc="seed of the codec's own numpy Generator")


class Codec:
    """Base class: ``encode`` -> self-describing bytes, stateless ``decode``, the cloud's ``backward`` rule."""

    name: ClassVar[str] = ""  # set with wire_id by @register(name, wire_id=...) (registry.py)
    wire_id: ClassVar[int] = 0
    version: int = 1  # payload version this implementation writes (an instance may override it)
    read_versions: ClassVar[tuple[int, ...]] = (1,)  # payload versions it reads
    minmax_version: ClassVar[int | None] = None  # the version written with grid="minmax" (grid codecs)
    PARAMS: ClassVar[Mapping[str, Param]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            raise ValueError(
                f"codec {self.name!r} has no parameter {unknown[0]!r}; allowed: {', '.join(self.PARAMS) or '(none)'}"
            )
        p = {}
        for k, spec in self.PARAMS.items():
            p[k] = spec.check(self.name, k, params.get(k, spec.default))
        self._p = p
        if p.get("grid") == "minmax" and self.minmax_version is not None:
            self.version = self.minmax_version  # the old grid writes the old payload version
        self._validate()

    # ------------------------------------------------------------------ settings

    @property
    def codec_id(self) -> int:
        return self.wire_id

    @property
    def params(self) -> dict[str, Any]:
        """JSON-serialisable settings: ``get(codec.name, **codec.params)`` rebuilds an equivalent codec."""
        return dict(self._p)

    def _validate(self) -> None:
        """Cross-parameter checks (override)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._p.items())})"

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        x: np.ndarray,
        *,
        step: int | None = None,
        total_rounds: int | None = None,
        training: bool = True,
    ) -> bytes:
        """Compresses a float array of rank 2..4 (cast to float32) into one payload.

        ``step``/``total_rounds`` (the training step t of this stream and the planned total T)
        matter to codecs with a schedule (SL-ACC); ``training=False`` marks evaluation batches (no
        state change; randomized codecs use their deterministic rule). Non-finite input raises ValueError.
        """
        x = check_input(x)
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
            raise ValueError(f"step must be a non-negative integer or None, got {step!r}")
        if total_rounds is not None and (
            isinstance(total_rounds, bool) or not isinstance(total_rounds, (int, np.integer)) or total_rounds < 1
        ):
            raise ValueError(f"total_rounds must be a positive integer or None, got {total_rounds!r}")
        params, sections = self._encode(x, step=step, total_rounds=total_rounds, training=bool(training))
        return fmt.build(self.codec_id, self.version, x.shape, params, sections)

    def _encode(self, x: np.ndarray, *, step, total_rounds, training) -> tuple[bytes, list]:
        raise NotImplementedError

    # ------------------------------------------------------------------ decode

    def decode(self, blob: bytes, *, max_bytes: int | None = None) -> np.ndarray:
        """Stateless, like :func:`splitedge.codecs.decode`, but only this codec's payloads: another
        codec's (a valid payload with another wire id) raises PayloadError naming both."""
        return self.decode_with_meta(blob, max_bytes=max_bytes)[0]

    def decode_with_meta(self, blob: bytes, *, max_bytes: int | None = None) -> tuple[np.ndarray, Meta]:
        """:func:`splitedge.codecs.decode_with_meta` for this stream: refuses other codecs' payloads
        (their meta would not fit this codec's backward rule)."""
        from . import _decode

        return _decode(blob, max_bytes, type(self))

    @classmethod
    def _decode(cls, h: fmt.Header) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    # ------------------------------------------------------------------ backward

    def backward(self, grad: np.ndarray, meta: Meta) -> np.ndarray:
        """The cloud's rule from dL/dQ(X) to the gradient it sends back. Default: identity (STE)."""
        return check_grad(grad, meta)

    def observe_gradient(self, grad: np.ndarray) -> None:
        """Called by the edge with the decoded gradient of the last encoded batch. Default: no-op."""

    def error_bound(self, x: np.ndarray, meta: Meta | None = None) -> float | None:
        """A guaranteed max |x - decode(encode(x))| for this input, or None where the codec has none.

        ``meta`` (from decode_with_meta of that payload) supplies the codec's own choices (bit widths,
        kept support); the bound is then recomputed from ``x`` itself, never read from the payload.
        """
        return None


# ---------------------------------------------------------------------- helpers


def check_input(x: Any) -> np.ndarray:
    """Validates an array to encode: floating, rank 2..4, non-empty; returns it C-contiguous float32."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"input must be a floating-point array (float32), got dtype {x.dtype}")
    if not fmt.MIN_RANK <= x.ndim <= fmt.MAX_RANK:
        raise ValueError(f"input must have rank {fmt.MIN_RANK}..{fmt.MAX_RANK} (N, C[, H[, W]]), got shape {x.shape}")
    if any(d < 1 for d in x.shape):
        raise ValueError(f"input must be non-empty, got shape {x.shape}")
    if any(d > 0xFFFFFFFF for d in x.shape):
        raise ValueError(f"input dimension over 2**32-1 in shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_finite(*values: Any, what: str = "input") -> None:
    """Raises ValueError if any of the given (reduced) values is NaN or infinite."""
    for v in values:
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{what} contains NaN or Inf: codecs encode finite values only")


def check_grad(grad: Any, meta: Meta) -> np.ndarray:
    g = np.ascontiguousarray(grad, dtype=np.float32)
    shape = meta.shape
    if g.shape != shape:
        raise ValueError(f"gradient shape {g.shape} does not match the decoded activation's shape {shape}")
    return g


def as3(x: np.ndarray) -> np.ndarray:
    """(N, C, S) view of a C-contiguous array of rank 2..4."""
    n, c = x.shape[:2]
    return x.reshape(n, c, -1)


def read_struct(h: fmt.Header, spec: str) -> tuple:
    st = struct.Struct("<" + spec)
    if len(h.params) != st.size:
        raise PayloadError(
            f"{h.codec_name} payload: parameter block of {len(h.params)} bytes, expected {st.size}"
        )
    return st.unpack(h.params)


def expect_sections(h: fmt.Header, sizes: Sequence[int | None] | int) -> None:
    secs = h.sections
    if isinstance(sizes, int):
        if len(secs) != sizes:
            raise PayloadError(f"{h.codec_name} payload: {len(secs)} sections, expected {sizes}")
        return
    if len(secs) != len(sizes):
        raise PayloadError(f"{h.codec_name} payload: {len(secs)} sections, expected {len(sizes)}")
    for i, (s, n) in enumerate(zip(secs, sizes)):
        if n is not None and s.nbytes != n:
            raise PayloadError(f"{h.codec_name} payload: section {i} has {s.nbytes} bytes, expected {n}")


def f32(section: memoryview, count: int | None = None, what: str = "values", finite: bool = True) -> np.ndarray:
    """float32 little-endian array from a section (a read-only view), optionally checked finite."""
    if section.nbytes % 4:
        raise PayloadError(f"{what}: {section.nbytes} bytes is not a whole number of float32")
    a = np.frombuffer(section, "<f4")
    if count is not None and a.size != count:
        raise PayloadError(f"{what}: {a.size} float32 values, expected {count}")
    if finite and a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        raise PayloadError(f"{what}: NaN or Inf in the payload")
    return a


def prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
