"""The codec registry: each codec states its name and wire id once, with :func:`register`.

::

    @register("uq", wire_id=3)
    class UQ(Codec): ...

The wire id is part of the payload format (byte 5 of the header, see
:mod:`splitedge.codecs.format`): an explicit number per codec, never list order, and an
assigned number never changes.  Registering a second codec under a taken name or id raises
ValueError at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any, TypeVar

T = TypeVar("T")

_CLASSES: dict[str, Any] = {}
_IDS: dict[str, int] = {}
_NAMES: dict[int, str] = {}

#: codec name -> wire id (read-only view of the registry)
CODEC_IDS = MappingProxyType(_IDS)
#: wire id -> codec name (read-only view of the registry)
CODEC_NAMES = MappingProxyType(_NAMES)
#: codec name -> class (read-only view of the registry)
CODEC_CLASSES = MappingProxyType(_CLASSES)


def register(name: str, *, wire_id: int) -> Callable[[T], T]:
    """Class decorator: registers a codec class under ``name`` with its payload ``wire_id`` (1..255)
    and sets the class attributes ``name`` and ``wire_id``."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"codec name must be a lower-case identifier, got {name!r}")
    if isinstance(wire_id, bool) or not isinstance(wire_id, int) or not 1 <= wire_id <= 255:
        raise ValueError(f"codec {name!r}: wire id must be an integer in 1..255 (one header byte), got {wire_id!r}")

    def deco(cls: T) -> T:
        if name in _CLASSES:
            raise ValueError(f"codec name {name!r} is already registered (wire id {_IDS[name]})")
        if wire_id in _NAMES:
            raise ValueError(f"codec wire id {wire_id} is already registered to {_NAMES[wire_id]!r}")
        cls.name = name  # type: ignore[attr-defined]
        cls.wire_id = wire_id  # type: ignore[attr-defined]
        _CLASSES[name] = cls
        _IDS[name] = wire_id
        _NAMES[wire_id] = name
        return cls

    return deco
