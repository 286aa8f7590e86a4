"""``manifest.json`` of an artifact directory: what was exported, and checksums.

This module is torch-free: the edge runtime reads manifests with it.

Layout of an artifact directory (format version 1)::

    manifest.json
    client/training_model.onnx    forward + ReduceSum(activation * grad_activation) + gradient graph
    client/eval_model.onnx        the train-mode forward (BatchNorm on batch statistics, running
                                  statistics untouched): the activation sent to the cloud
    client/inference_model.onnx   forward with BatchNorm on running statistics (evaluation, TensorRT/CANN)
    client/optimizer_model.onnx   ORT's SGD or AdamW
    client/checkpoint             ORT checkpoint: trainable and frozen (BatchNorm statistics) parameters
    client/portable/forward_train.onnx  portable backend: train-mode forward (input + parameters in;
                                  activation, moved BatchNorm statistics, saved tensors out)
    client/portable/backward.onnx       portable backend: saved tensors + grad_activation + parameters
                                  in; parameter gradients out
    client/portable/inference.onnx      portable backend: eval-mode forward, parameters as inputs
    client/portable/params.npz          portable backend: initial parameters and BatchNorm statistics
    server/model.safetensors      the server sub-model's state_dict (torchvision key names)

The ``portable`` key describes the portable graphs (files, opset, IR version, allowed op types,
optimizer). Manifests written before it existed have none; older readers ignore it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

CLIENT_FILES = (
    "client/training_model.onnx",
    "client/eval_model.onnx",
    "client/inference_model.onnx",
    "client/optimizer_model.onnx",
    "client/checkpoint",
)
SERVER_WEIGHTS = "server/model.safetensors"


class ManifestError(ValueError):
    """An artifact directory is missing, malformed, or its files do not match their checksums."""


@dataclass(frozen=True)
class Optimizer:
    name: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6


@dataclass(frozen=True)
class Manifest:
    model: str
    cut: int
    cut_name: str
    input_shape: tuple[int, ...]  # per sample, C,H,W
    activation_shape: tuple[int, ...]  # per sample
    num_classes: int
    optimizer: Optimizer
    opset: int
    trainable_params: tuple[str, ...]
    frozen_params: tuple[str, ...]
    versions: dict[str, str]
    files: dict[str, str]  # relative path -> sha256
    seed: int | None = None
    weights: str | None = None  # where the initial weights came from
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: the portable backend's plain ONNX graphs (files, opset, IR version, optimizer); None in
    #: manifests written before it existed. A top-level key older readers ignore, so the format
    #: version stays 1.
    portable: dict[str, Any] | None = None

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format_version {version!r} is not supported (this splitedge reads {FORMAT_VERSION}); "
                "re-export with this version of export-client"
            )
        try:
            opt = Optimizer(**{**d["optimizer"], "betas": tuple(d["optimizer"].get("betas", (0.9, 0.999)))})
            return cls(
                model=str(d["model"]),
                cut=int(d["cut"]),
                cut_name=str(d["cut_name"]),
                input_shape=tuple(int(v) for v in d["input_shape"]),
                activation_shape=tuple(int(v) for v in d["activation_shape"]),
                num_classes=int(d["num_classes"]),
                optimizer=opt,
                opset=int(d["opset"]),
                trainable_params=tuple(d["trainable_params"]),
                frozen_params=tuple(d["frozen_params"]),
                versions=dict(d["versions"]),
                files=dict(d["files"]),
                seed=d.get("seed"),
                weights=d.get("weights"),
                format_version=int(version),
                extra=dict(d.get("extra", {})),
                portable=dict(d["portable"]) if isinstance(d.get("portable"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest.json is malformed: {type(e).__name__}: {e}") from None


def client_digest(m: Manifest) -> str:
    """A short digest of the edge half's files (client/): equal for the cloud's full artifact directory
    and a board's bundle (whose manifest lists client/ only) when they come from one export."""
    client = {k: v for k, v in sorted(m.files.items()) if k.startswith("client/")}
    return hashlib.sha256(json.dumps(client, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(directory: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Reads ``DIR/manifest.json``; with ``verify`` checks every file's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ManifestError(f"artifact directory {str(directory)!r} does not exist (run export-client first)")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: {directory} is not an export-client artifact directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    m = Manifest.from_dict(raw)
    if verify:
        verify_files(directory, m)
    return m


def verify_files(directory: str | os.PathLike[str], m: Manifest, only: tuple[str, ...] | None = None) -> None:
    directory = Path(directory)
    for rel, digest in m.files.items():
        if only is not None and rel not in only:
            continue
        p = directory / rel
        if not p.is_file():
            raise ManifestError(f"{p} is missing (listed in manifest.json)")
        got = sha256_file(p)
        if got != digest:
            raise ManifestError(f"{p} does not match its sha256 in manifest.json (file changed or corrupt)")
