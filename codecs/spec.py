"""``CodecSpec``: which codec, with which settings -- the one value that names a codec stream.

The cloud's configuration (``ServeConfig.codec``/``grad_codec``), the WELCOME message's
``codec``/``grad_codec`` fields and the experiment grid's codec entries all hold one::

    spec = CodecSpec("uq", {"bits": 4})
    codec = spec.build()                      # a new codec object (one per stream)
    CodecSpec.of(codec).to_json()             # {"name": "uq", "params": {...every setting...}}
    CodecSpec.from_json(obj, where="WELCOME.codec")

``params`` is stored as sorted ``(key, value)`` pairs, so a spec is hashable and compares
equal for equal settings; ``dict(spec.params)`` gives the keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Codec

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True, init=False)
class CodecSpec:
    """A codec's registry name and its parameters (a mapping or pairs; kept as sorted pairs)."""

    name: str
    params: tuple[tuple[str, Any], ...]

    def __init__(self, name: str, params: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a codec name must be a non-empty string, got {name!r}")
        object.__setattr__(self, "name", name)
        items = list(params.items()) if isinstance(params, Mapping) else list(_pairs(params))
        for k, v in items:
            if not isinstance(k, str):
                raise ValueError(f"codec {self.name!r}: parameter names must be strings, got {k!r}")
            if not isinstance(v, _SCALARS):
                raise ValueError(f"codec {self.name!r}: parameter {k!r} must be a number, string, "
                                 f"true/false or null, got {type(v).__name__}")
        if len({k for k, _ in items}) != len(items):
            raise ValueError(f"codec {self.name!r}: a parameter is given twice in {items!r}")
        object.__setattr__(self, "params", tuple(sorted(items)))

    @property
    def kwargs(self) -> dict[str, Any]:
        """The parameters as keyword arguments of :func:`splitedge.codecs.get`."""
        return dict(self.params)

    def build(self) -> Codec:
        """A new codec object of these settings; ValueError names an unknown codec or a bad parameter."""
        from . import get

        return get(self.name, **self.kwargs)

    def resolved(self) -> CodecSpec:
        """The same codec with every parameter spelled out (defaults filled in), after validation."""
        return CodecSpec.of(self.build())

    @classmethod
    def of(cls, codec: Codec) -> CodecSpec:
        """The spec that rebuilds ``codec`` (its name and all of its settings)."""
        return cls(codec.name, codec.params)

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}``: the JSON form (WELCOME, checkpoints, results)."""
        return {"name": self.name, "params": self.kwargs}

    @classmethod
    def from_json(cls, obj: Any, where: str = "codec") -> CodecSpec:
        """Parses the JSON form; ValueError naming ``where`` if it is not ``{"name": str, "params": {...}}``."""
        if not isinstance(obj, Mapping) or set(obj) != {"name", "params"}:
            got = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{where} must be an object with exactly 'name' and 'params', got {got}")
        if not isinstance(obj["params"], Mapping):
            raise ValueError(f"{where}.params must be an object, got {type(obj['params']).__name__}")
        try:
            return cls(obj["name"], obj["params"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _pairs(raw: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    for item in raw:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"codec parameters must be a mapping or (name, value) pairs, got {item!r}")
        yield item
