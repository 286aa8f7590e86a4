"""Errors both edge backends raise (kept free of onnxruntime, so either backend can be chosen
without importing the other)."""

from __future__ import annotations

import os
from pathlib import Path

from ..export import manifest as mf

BACKENDS = ("ort-training", "portable")
DEFAULT_BACKEND = "ort-training"


class ModelLoadError(RuntimeError):
    """ONNX Runtime cannot load a model or checkpoint file (``path`` names it)."""

    def __init__(self, message: str, path: str | os.PathLike[str]):
        super().__init__(message)
        self.path = Path(path)


class CheckpointLoadError(ModelLoadError):
    """The edge checkpoint given to an edge model (a --resume checkpoint) cannot be loaded."""


class BackendMismatch(mf.ManifestError):
    """A checkpoint written by one edge backend given to the other."""


def checkpoint_backend(path: str | os.PathLike[str]) -> str | None:
    """Which backend wrote the edge checkpoint at ``path``: the portable one writes an npz (a zip
    archive), ONNX Runtime training a flatbuffer. None when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return "portable" if head == b"PK\x03\x04" else "ort-training"


def mismatch_message(path: str | os.PathLike[str], written_by: str, wanted: str) -> str:
    return (f"{path} was written by the {written_by} edge backend and cannot be resumed with --backend {wanted}: "
            f"resume with --backend {written_by}, or start fresh with an empty --checkpoint-dir")
