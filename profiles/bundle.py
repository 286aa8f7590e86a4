"""The edge bundle: everything a board needs to run ``edge-train``, in one deterministic tar.gz.

Layout (unpacked into ``<remote-dir>/releases/<bundle-id>/`` by flash-board)::

    BUNDLE.json          what is in the bundle: profile, artifacts, ORT build, sha256 of every file
    run.sh               launcher: ./run.sh selftest | ./run.sh train ... | ./run.sh python ...
    profile.toml         the device profile (validated before bundling)
    requirements.txt     pinned Python requirements for the board; how to get the ORT build
    artifacts/           manifest.json and client/ of an export-client artifact directory
    splitedge_edge/splitedge/...   the torch-free edge runtime, importable as ``splitedge``:
                         wire/ (protocol, transport, security, shaping), fsutil, codecs/, export/manifest,
                         runtime_edge/ (ort_backend, data, client, cli), profiles/ (schema,
                         select, cli, selftest, *.toml)

Only the client half of the artifacts travels: the board never needs the cloud's
``server/`` weights. The bundled ``artifacts/manifest.json`` is the original with its
``files`` narrowed to ``client/`` and a note in ``extra.bundle`` (the original's sha256,
what was left out), so the edge runtime's checksum verification still covers every file
it reads.

The archive is deterministic: entries sorted, fixed mtime, uid/gid 0, fixed modes, gzip
header without name or time. The same inputs give the same bytes, and the bundle id is
the first 16 hex digits of the archive's sha256.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .schema import Profile

BUNDLE_FORMAT = 1
MTIME = 1704067200  # 2024-01-01T00:00:00Z: fixed, and not so old that tar warns about it
EDGE_ROOT = "splitedge_edge"

# The edge runtime is what these modules import, followed through every `import`/`from ... import`
# of splitedge modules in their source (also the lazy ones inside functions), found through the
# import system, so an editable and a regular install bundle the same files; plus the codecs
# package whole. Modules that need torch or only serve the host are never bundled.
EDGE_ENTRY_POINTS = (
    "splitedge.runtime_edge.cli",
    "splitedge.runtime_edge.client",
    "splitedge.runtime_edge.ort_backend",
    "splitedge.runtime_edge.portable_backend",
    "splitedge.profiles.selftest",
    "splitedge.profiles.cli",
)
EDGE_PACKAGES = {"splitedge.codecs": ()}  # whole packages: every .py but these
NOT_ON_BOARD = (
    "splitedge.export.onnx_export", "splitedge.export.split", "splitedge.export.zoo", "splitedge.export.cli",
    "splitedge.runtime_cloud", "splitedge.lab", "splitedge.cli", "splitedge.profiles.flash",
    "splitedge.profiles.flash_cli", "splitedge.profiles.bundle",
)
EXPORT_INIT = b'"""The edge bundle carries only the torch-free manifest reader of splitedge.export."""\n'
PINNED = ("numpy", "pyzmq", "click")  # the edge's own requirements, pinned to this machine's versions


class BundleError(ValueError):
    """The artifacts or the sources cannot be bundled (missing, corrupt, ...)."""


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    size: int
    files: int
    manifest: dict

    @property
    def id(self) -> str:
        return self.sha256[:16]


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find the module {name} to bundle")
    return Path(spec.origin)


def _not_on_board(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NOT_ON_BOARD)


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return bool(spec and spec.submodule_search_locations)


def _imports_of(name: str, src: Path) -> set[str]:
    """The splitedge modules ``src`` (module ``name``) imports, anywhere in its body."""
    pkg = name if src.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(src.read_text(encoding="utf-8"), str(src))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "splitedge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "splitedge":
                continue
            out.add(base)
            if _is_package(base):
                out.update(f"{base}.{a.name}" for a in node.names
                           if a.name != "*" and importlib.util.find_spec(f"{base}.{a.name}") is not None)
    return out


def edge_module_names() -> list[str]:
    """Every splitedge module the edge runtime needs on the board (see EDGE_ENTRY_POINTS)."""
    todo = list(EDGE_ENTRY_POINTS)
    for name, skip in EDGE_PACKAGES.items():
        todo += [f"{name}.{p.stem}" for p in sorted(_module_file(name).parent.glob("*.py"))
                 if p.name not in skip and p.name != "__init__.py"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or _not_on_board(name):
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports_of(name, _module_file(name)))
    return sorted(seen)


def edge_sources() -> dict[str, Path]:
    """arcname (under ``splitedge_edge/``) -> source file, for the edge runtime's files."""
    out: dict[str, Path] = {}
    for name in edge_module_names():
        if name == "splitedge.export":
            continue  # replaced by EXPORT_INIT: the real one may grow torch imports
        src = _module_file(name)
        rel = Path(*name.split("."))
        rel = rel / "__init__.py" if src.name == "__init__.py" else rel.with_suffix(".py")
        out[f"{EDGE_ROOT}/{rel.as_posix()}"] = src
    profiles_dir = _module_file("splitedge.profiles").parent
    for src in sorted(profiles_dir.glob("*.toml")):
        out[f"{EDGE_ROOT}/splitedge/profiles/{src.name}"] = src
    return out


def pinned_versions() -> dict[str, str]:
    out = {}
    for dist in PINNED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise BundleError(f"{dist} is not installed here, so its version cannot be pinned for the board") from None
    return out


def requirements_text(profile: Profile, versions: dict[str, str]) -> str:
    o = profile.ort
    lines = [
        f"# splitedge edge bundle, profile {profile.name}: {profile.description}",
        f"# Python >= {profile.board.python} on {profile.board.arch}. Install on the board with:",
        "#   python3 -m pip install -r requirements.txt     (or flash-board --install-deps)",
        "# the edge runtime's own requirements, pinned to the versions splitedge was tested with:",
        *(f"{d}=={v}" for d, v in versions.items()),
        f"# ONNX Runtime: {o.package} {o.version}, {o.origin}",
    ]
    if o.source == "pypi":
        lines += list(o.requirements)
        if any(r.replace(" ", "").startswith("torch==") for r in o.requirements):
            lines += [
                "# (torch: ORT's training package imports it. PyPI's x86_64 torch is the CUDA build, GBs of",
                "#  nvidia-* wheels; the CPU build satisfies the same pin: pip install torch==<version>+cpu",
                "#  --index-url https://download.pytorch.org/whl/cpu)",
            ]
    else:
        lines += [
            f"# NOT installable from PyPI for this board: no wheel of {o.package} {o.version} exists for it.",
            f"# Build it from source (docs/deploying.md), in a checkout of onnxruntime v{o.version}:",
            "#   git clone --recursive --branch v" + o.version + " https://github.com/microsoft/onnxruntime",
            f"#   cd onnxruntime && {o.build}",
            "#   python3 -m pip install build/Linux/Release/dist/*.whl",
        ]
        if profile.backend == "ort-training":
            lines.append("# ORT's training package imports torch: install a torch build for this board's Python too.")
        lines += [f"# {r}" for r in o.requirements]
    return "\n".join(lines) + "\n"


def run_sh(profile: Profile) -> str:
    major, minor = profile.board.python_tuple
    return f"""#!/bin/sh
# splitedge edge bundle, profile {profile.name}. Commands:
#   ./run.sh selftest [--json]   load the artifacts with the profile's providers, run one forward, one
#                                train step and one inference on random data, encode one payload;
#                                prints what ran where; exit code 0 only on success
#   ./run.sh train --connect tcp://CLOUD:5555 --client-id 0 --num-clients 2 --data DATASET ...
#                                edge-train with this bundle's artifacts and profile (edge-train --help)
#   ./run.sh python ARGS...      the board's Python with this bundle's splitedge first on the path
# PYTHON=/path/to/python3.11 ./run.sh ... picks the interpreter (default: python3). Python runs with -P:
# neither the current directory nor a script's directory is put ahead of the bundle on sys.path.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P)
py=${{PYTHON:-python3}}
PYTHONPATH="$here/{EDGE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"
export PYTHONPATH
if ! "$py" -c 'import sys; sys.exit(sys.version_info < ({major}, {minor}))' 2>/dev/null; then
  echo "run.sh: '$py' is not Python >= {profile.board.python} (set PYTHON=/path/to/python{profile.board.python})" >&2
  exit 2
fi
cmd=${{1:-help}}
if [ $# -gt 0 ]; then shift; fi
case "$cmd" in
  selftest) exec "$py" -P -m splitedge.profiles.selftest --bundle "$here" "$@" ;;
  train) exec "$py" -P -m splitedge.runtime_edge.cli --artifacts "$here/artifacts" --profile "$here/profile.toml" "$@" ;;
  python) exec "$py" -P "$@" ;;
  help|-h|--help) sed -n '2,11p' "$0" ;;
  *) echo "run.sh: unknown command '$cmd' (selftest, train, python, help)" >&2; exit 2 ;;
esac
"""


def _artifact_entries(artifacts: Path) -> tuple[dict[str, bytes | Path], dict]:
    """The client half of an artifact directory, checked against its manifest, and the narrowed manifest."""
    from ..export import manifest as mf

    try:
        m = mf.load(artifacts, verify=False)
        client = tuple(f for f in m.files if f.startswith("client/"))
        mf.verify_files(artifacts, m, only=client)
    except mf.ManifestError as e:
        raise BundleError(str(e)) from None
    missing = [f for f in mf.CLIENT_FILES if f not in client]
    if missing:
        raise BundleError(f"{artifacts}/manifest.json does not list {', '.join(missing)}: not an edge artifact directory")
    raw_bytes = (artifacts / mf.MANIFEST_NAME).read_bytes()
    raw = json.loads(raw_bytes)
    left_out = sorted(f for f in raw["files"] if f not in client)
    raw["files"] = {f: raw["files"][f] for f in client}
    raw.setdefault("extra", {})["bundle"] = {
        "original_manifest_sha256": hashlib.sha256(raw_bytes).hexdigest(), "left_out": left_out,
        "why": "the edge bundle carries only the client half",
    }
    entries: dict[str, bytes | Path] = {f"artifacts/{f}": artifacts / f for f in client}
    entries["artifacts/manifest.json"] = (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()
    summary = {"model": m.model, "cut": m.cut, "input_shape": list(m.input_shape),
               "activation_shape": list(m.activation_shape), "num_classes": m.num_classes,
               "original_manifest_sha256": raw["extra"]["bundle"]["original_manifest_sha256"], "left_out": left_out}
    return entries, summary


class _HashSink(io.RawIOBase):
    """A write-only file that keeps only the sha256 and the size (for --dry-run)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return len(b)


class _Tee(io.RawIOBase):
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a bundle this module wrote (a tar.gz whose BUNDLE.json says so)."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            member = tar.extractfile("BUNDLE.json")
            meta = json.loads(member.read(1 << 20)) if member is not None else None
    except (OSError, tarfile.TarError, KeyError, ValueError, EOFError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == "splitedge-edge-bundle"


def build(profile: Profile, artifacts: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None
          ) -> BundleInfo:
    """Writes the bundle to ``dest`` (atomically), or only hashes it when ``dest`` is None (--dry-run)."""
    artifacts = Path(artifacts)
    if not artifacts.is_dir():
        raise BundleError(f"artifact directory {str(artifacts)!r} does not exist (run export-client first)")
    entries: dict[str, bytes | Path] = dict(edge_sources())
    entries[f"{EDGE_ROOT}/splitedge/export/__init__.py"] = EXPORT_INIT
    art, art_summary = _artifact_entries(artifacts)
    entries.update(art)
    entries["profile.toml"] = Path(profile.path).read_bytes()
    versions = pinned_versions()
    entries["requirements.txt"] = requirements_text(profile, versions).encode()
    entries["run.sh"] = run_sh(profile).encode()
    data = {k: (v if isinstance(v, bytes) else v.read_bytes()) for k, v in entries.items()}

    import splitedge

    manifest = {
        "format": BUNDLE_FORMAT, "kind": "splitedge-edge-bundle", "splitedge": splitedge.__version__,
        "profile": profile.name, "profile_sha256": hashlib.sha256(data["profile.toml"]).hexdigest(),
        "arch": profile.board.arch, "python": profile.board.python,
        "ort": {"package": profile.ort.package, "version": profile.ort.version, "source": profile.ort.source},
        "requirements": versions, "artifacts": art_summary,
        "files": {k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in sorted(data.items())},
    }
    data["BUNDLE.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    def write(raw: BinaryIO) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(data):
                    info = tarfile.TarInfo(name)
                    info.size = len(data[name])
                    info.mtime = MTIME
                    info.mode = 0o755 if name == "run.sh" else 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data[name]))

    if dest is None:
        sink = _HashSink()
        write(sink)  # type: ignore[arg-type]
        return BundleInfo(sink.h.hexdigest(), sink.n, len(data), manifest)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            tee = _Tee(f)
            write(tee)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return BundleInfo(tee.h.hexdigest(), tee.n, len(data), manifest)
