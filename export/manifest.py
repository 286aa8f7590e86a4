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
import math
import os
import re
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
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """A Manifest from its JSON; :class:`ManifestError` naming the field of a wrong type or range."""
        if not isinstance(d, dict):
            raise ManifestError("manifest.json must hold a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ManifestError(
                f"manifest format_version {str(version)[:40]!r} is not supported (this splitedge reads "
                f"{FORMAT_VERSION}); re-export with this version of export-client"
            )
        try:
            opt = d["optimizer"]
            _want(isinstance(opt, dict), "optimizer", "an object")
            unknown = sorted(set(opt) - {"name", "lr", "weight_decay", "betas", "eps"})
            _want(not unknown, "optimizer", f"an object without {unknown[:3]}")
            betas = opt.get("betas", [0.9, 0.999])
            _want(isinstance(betas, list) and len(betas) == 2 and all(_real(b, 0, 1) for b in betas),
                  "optimizer.betas", "two numbers in 0..1")
            optimizer = Optimizer(
                name=_str(opt, "name", "optimizer.name"), lr=_num(opt, "lr", "optimizer.lr", 0, 1e6, positive=True),
                weight_decay=_num(opt, "weight_decay", "optimizer.weight_decay", 0, 1e6, default=0.0),
                betas=(float(betas[0]), float(betas[1])),
                eps=_num(opt, "eps", "optimizer.eps", 0, 1, default=1e-6, positive=True),
            )
            files = d["files"]
            _want(isinstance(files, dict) and all(isinstance(k, str) and _safe_rel(k) and isinstance(v, str)
                                                  and _SHA256.fullmatch(v) for k, v in files.items()),
                  "files", "an object of relative paths inside the artifact directory and sha256 hex digests")
            versions = d["versions"]
            _want(isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()),
                  "versions", "an object of strings")
            extra = d.get("extra", {})
            _want(isinstance(extra, dict), "extra", "an object")
            portable = d.get("portable")
            _want(portable is None or isinstance(portable, dict), "portable", "null or an object")
            seed, weights = d.get("seed"), d.get("weights")
            _want(seed is None or _int(seed, -2**63, 2**64), "seed", "null or an integer")
            _want(weights is None or isinstance(weights, str), "weights", "null or a string")
            return cls(
                model=_str(d, "model", "model"),
                cut=_intfield(d, "cut", 0, 1000),
                cut_name=_str(d, "cut_name", "cut_name"),
                input_shape=_shape(d, "input_shape"),
                activation_shape=_shape(d, "activation_shape"),
                num_classes=_intfield(d, "num_classes", 1, 1 << 20),
                optimizer=optimizer,
                opset=_intfield(d, "opset", 1, 1000),
                trainable_params=_names(d, "trainable_params"),
                frozen_params=_names(d, "frozen_params"),
                versions=dict(versions),
                files=dict(files),
                seed=seed,
                weights=weights,
                format_version=int(version),
                extra=dict(extra),
                portable=dict(portable) if portable is not None else None,
            )
        except KeyError as e:
            raise ManifestError(f"manifest.json is malformed: it lacks the field {e}") from None


_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 1 << 16  # of one dimension of a shape
MAX_ELEMENTS = 1 << 31  # of one sample's input or activation


def _want(ok: bool, field: str, what: str) -> None:
    if not ok:
        raise ManifestError(f"manifest.json is malformed: {field} must be {what}")


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _intfield(d: dict, key: str, lo: int, hi: int) -> int:
    _want(_int(d[key], lo, hi), key, f"an integer in {lo}..{hi}")
    return d[key]


def _num(d: dict, key: str, field: str, lo: float, hi: float, *, default: float | None = None,
         positive: bool = False) -> float:
    v = d.get(key, default) if default is not None else d[key]
    _want(_real(v, lo, hi) and (v > 0 or not positive), field,
          f"a finite number in {'(' if positive else '['}{lo:g}, {hi:g}]")
    return float(v)


def _str(d: dict, key: str, field: str) -> str:
    _want(isinstance(d[key], str) and 0 < len(d[key]) <= 200, field, "a non-empty string")
    return d[key]


def _shape(d: dict, key: str) -> tuple[int, ...]:
    v = d[key]
    _want(isinstance(v, list) and 1 <= len(v) <= 4 and all(_int(x, 1, MAX_DIM) for x in v)
          and math.prod(v) <= MAX_ELEMENTS, key, f"a list of 1 to 4 integers in 1..{MAX_DIM}")
    return tuple(v)


def _names(d: dict, key: str) -> tuple[str, ...]:
    v = d[key]
    _want(isinstance(v, list) and all(isinstance(x, str) for x in v), key, "a list of strings")
    return tuple(v)


def _safe_rel(rel: str) -> bool:
    """A path inside the artifact directory: relative, no ``..``, no backslash or NUL."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and "\0" not in rel and \
        all(p not in ("", ".", "..") for p in parts)


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
    from ..fsutil import BadFile, load_json

    try:
        raw = load_json(path, max_bytes=4 << 20)
    except BadFile as e:
        if e.why == "missing":
            raise ManifestError(f"{path} not found: {directory} is not an export-client artifact directory") from None
        raise ManifestError(f"cannot read {path}: {e.why}") from None
    try:
        m = Manifest.from_dict(raw)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
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
