"""Device profiles: versioned TOML files, loaded into frozen dataclasses and validated strictly.

A profile says what a board is and how the edge runtime should use it: the
architecture and the Python it is tested with, the ONNX Runtime build it needs
(and where that build comes from), the execution providers for the forward-only
graph and for training, in order of preference, their options, and the runtime
settings (threads, default batch size, memory budget).

Schema (``schema_version = 1``); every key is checked, unknown keys are errors::

    schema_version = 1                      # int, required: 1
    name = "jetson-nano"                    # str, required: [a-z0-9][a-z0-9-]*
    description = "..."                     # str, required
    notes = '''...'''                       # str, optional

    [board]                                 # required
    arch = "aarch64"                        # "x86_64" | "aarch64"
    python = "3.11"                         # the Python the bundle is tested with (minimum), "3.N"
    os = "JetPack 4.6.x (Ubuntu 18.04)"     # str, informational

    [ort]                                   # required: the ONNX Runtime build the board needs
    package = "onnxruntime-training"        # str
    version = "1.19.2"                      # str, "X.Y.Z"
    source = "source"                       # "pypi" (a wheel pip installs) | "source" (built on/for the board)
    origin = "..."                          # str: where the build comes from, in words
    requirements = ["..."]                  # list of pip requirement lines (may be empty for "source")
    build = "./build.sh ..."                # str: the build command line ("" for "pypi")

    [providers]                             # required; ORT provider names, preferred first
    forward = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    training = ["CUDAExecutionProvider", "CPUExecutionProvider"]   # only CUDA and CPU

    [tensorrt]                              # optional; only with TensorrtExecutionProvider in forward
    fp16 = true                             # bool (default true)
    engine_cache = true                     # bool (default true)
    engine_cache_dir = "trt-engines"        # str; relative: inside the artifact directory

    [cuda]                                  # optional; only with CUDAExecutionProvider in a list
    device_id = 0                           # int >= 0

    [cann]                                  # optional; only with CANNExecutionProvider in forward
    device_id = 0                           # int >= 0

    [runtime]                               # required
    threads = 4                             # int >= 0 (0: ONNX Runtime's default)
    batch_size = 16                         # int >= 1: edge-train's default --batch-size
    memory_budget_mb = 2500                 # int >= 1: the self-test fails above this peak RSS

    [[stack]]                               # optional, repeatable: the runtime stacks that serve this board,
    name = "jetpack-4.6-gpu"                # one per OS release and path (GPU, NPU, CPU); str, [a-z0-9.-]
    os = "JetPack 4.6.x (L4T R32.7.x)"      # str, required: the OS image / SDK release it is for
    python = "3.6"                          # "3.N", required: the Python its wheels are built for
    packages = ["onnxruntime-gpu==1.11.0"]  # list of str, required: exact packages and versions, and where from
    system = ["TensorRT 8.2.1"]             # list of str, optional: what the OS image itself brings
    inference = "TensorRT"                  # where each portable graph runs: TensorRT, CUDA, CANN, ATC, CPU;
    forward = "CUDA"                        #   inference = the forward-only graph, forward/backward = the
    backward = "CUDA"                       #   training step's two graphs (plain ONNX, opset 13)
    usable = false                          # bool, required: does splitedge's edge runtime run on it as is?
    why = "..."                             # str, required: why the graphs land where they do / why not usable
    tested = "..."                          # str, optional: what was tried where ("" = nothing)

``[[stack]]`` entries are what ``splitedge profiles show`` summarizes ("which packages, which
graph runs where, can the accelerator train"); nothing selects providers from them. A stack
whose ``inference`` graph runs on an accelerator while ``forward`` or ``backward`` stay on the
CPU is an accelerator path that cannot train, and is shown as such.

Both provider lists must end with ``CPUExecutionProvider`` (the fallback every ORT
build has). The training list may only hold CUDA and CPU: ORT's training API takes
the devices ``cpu`` and ``cuda`` only; TensorRT and CANN serve forward-only graphs.

This module is light: standard library only (no onnxruntime, no torch, no click).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the edge runs on CPython 3.8+: tomli is tomllib's own source, a requirement there
    import tomli as tomllib

SCHEMA_VERSIONS = (1,)
PROFILE_DIR = Path(__file__).resolve().parent

# onnxruntime.get_all_providers() of ORT 1.19.2 (a test checks the two agree)
ORT_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider", "ROCMExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "TvmExecutionProvider", "VitisAIExecutionProvider",
    "QNNExecutionProvider", "NnapiExecutionProvider", "VSINPUExecutionProvider", "JsExecutionProvider",
    "CoreMLExecutionProvider", "ArmNNExecutionProvider", "ACLExecutionProvider", "DmlExecutionProvider",
    "RknpuExecutionProvider", "WebNNExecutionProvider", "XnnpackExecutionProvider", "CANNExecutionProvider",
    "AzureExecutionProvider", "CPUExecutionProvider",
)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CANN = "CANNExecutionProvider"
TRAINING_PROVIDERS = (CUDA, CPU)
ARCHES = ("x86_64", "aarch64")
SOURCES = ("pypi", "source")

_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
_PYTHON = re.compile(r"3\.\d{1,2}\Z")
_VERSION = re.compile(r"\d+\.\d+\.\d+\Z")


_UNSET: Any = object()


class ProfileError(ValueError):
    """A profile file is missing, not TOML, or breaks the schema; names the file, the key, the
    allowed values and the value received."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 allowed: str | None = None, value: Any = _UNSET):
        self.path, self.key, self.allowed = path, key, allowed
        self.value = None if value is _UNSET else value
        parts = [p for p in (path, f"key '{key}'" if key else None) if p]
        text = (": ".join(parts) + ": " if parts else "") + message
        if allowed is not None:
            text += f"; allowed: {allowed}"
        if value is not _UNSET:
            text += f"; got {value!r}"
        super().__init__(text)


@dataclass(frozen=True)
class Board:
    arch: str
    python: str
    os: str = ""

    @property
    def python_tuple(self) -> tuple[int, int]:
        major, minor = self.python.split(".")
        return int(major), int(minor)


@dataclass(frozen=True)
class OrtBuild:
    package: str
    version: str
    source: str
    origin: str
    requirements: tuple[str, ...] = ()
    build: str = ""


@dataclass(frozen=True)
class TensorRTOptions:
    fp16: bool = True
    engine_cache: bool = True
    engine_cache_dir: str = "trt-engines"


@dataclass(frozen=True)
class DeviceOptions:
    device_id: int = 0


PLACES = ("TensorRT", "CUDA", "CANN", "ATC", "CPU")  # where a graph of a [[stack]] can run
GRAPHS = ("inference", "forward", "backward")


@dataclass(frozen=True)
class Stack:
    """One runtime stack that serves the board: an OS release, its Python, exact packages, and
    where each of the portable backend's graphs runs with it."""

    name: str
    os: str
    python: str
    packages: tuple[str, ...]
    inference: str
    forward: str
    backward: str
    usable: bool
    why: str
    system: tuple[str, ...] = ()
    tested: str = ""

    @property
    def accelerated(self) -> bool:
        return any(getattr(self, g) != "CPU" for g in GRAPHS)

    @property
    def trains_on_accelerator(self) -> bool:
        return self.forward != "CPU" and self.backward != "CPU"

    @property
    def placement(self) -> str:
        """e.g. ``inference: TensorRT; forward: CPU; backward: CPU``."""
        return "; ".join(f"{g}: {getattr(self, g)}" for g in GRAPHS)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "os": self.os, "python": self.python, "packages": list(self.packages),
                "system": list(self.system), "inference": self.inference, "forward": self.forward,
                "backward": self.backward, "usable": self.usable, "why": self.why, "tested": self.tested,
                "trains_on_accelerator": self.trains_on_accelerator}


@dataclass(frozen=True)
class Runtime:
    threads: int
    batch_size: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Profile:
    schema_version: int
    name: str
    description: str
    board: Board
    ort: OrtBuild
    forward: tuple[str, ...]
    training: tuple[str, ...]
    runtime: Runtime
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    cuda: DeviceOptions = field(default_factory=DeviceOptions)
    cann: DeviceOptions = field(default_factory=DeviceOptions)
    notes: str = ""
    stacks: tuple[Stack, ...] = ()
    path: str = ""  # the file it was read from

    @property
    def backend(self) -> str:
        """The edge backend this profile's ONNX Runtime can train with: ``ort-training`` for ORT's
        training build (``onnxruntime-training*``), ``portable`` for any other (plain) build."""
        return "ort-training" if self.ort.package.startswith("onnxruntime-training") else "portable"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the file's layout (without ``path``)."""
        d: dict[str, Any] = {
            "schema_version": self.schema_version, "name": self.name, "description": self.description,
            "notes": self.notes,
            "board": {"arch": self.board.arch, "python": self.board.python, "os": self.board.os},
            "ort": {"package": self.ort.package, "version": self.ort.version, "source": self.ort.source,
                    "origin": self.ort.origin, "requirements": list(self.ort.requirements), "build": self.ort.build},
            "providers": {"forward": list(self.forward), "training": list(self.training)},
            "runtime": {"threads": self.runtime.threads, "batch_size": self.runtime.batch_size,
                        "memory_budget_mb": self.runtime.memory_budget_mb},
        }
        if TENSORRT in self.forward:
            d["tensorrt"] = {"fp16": self.tensorrt.fp16, "engine_cache": self.tensorrt.engine_cache,
                             "engine_cache_dir": self.tensorrt.engine_cache_dir}
        if CUDA in self.forward or CUDA in self.training:
            d["cuda"] = {"device_id": self.cuda.device_id}
        if CANN in self.forward:
            d["cann"] = {"device_id": self.cann.device_id}
        if self.stacks:
            d["stack"] = [st.to_dict() for st in self.stacks]
        return d


# ---------------------------------------------------------------------------------------- reading


def shipped() -> list[str]:
    """Names of the profiles shipped with splitedge (``profiles/*.toml``), sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped profile's name, or the path of a profile file."""
    s = os.fspath(name_or_path)
    if _NAME.match(s) and not os.path.exists(s):
        p = PROFILE_DIR / f"{s}.toml"
        if p.is_file():
            return p
        raise ProfileError(f"no profile named {s!r}; shipped profiles: {', '.join(shipped())} "
                           "(or pass the path of a profile file)")
    p = Path(s)
    if p.is_dir():
        raise ProfileError(f"profile {s!r} is a directory, not a profile file (a .toml, or a shipped profile's "
                           f"name: {', '.join(shipped())})")
    if not p.is_file():
        raise ProfileError(f"profile file {s!r} does not exist (shipped profiles: {', '.join(shipped())})")
    return p


def load(name_or_path: str | os.PathLike[str]) -> Profile:
    """Reads and validates a profile; every problem raises :class:`ProfileError`."""
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read the profile: {e}", path=str(path)) from None
    return loads(text, path=str(path))


def loads(text: str, *, path: str = "<string>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"not valid TOML: {e}", path=path) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ProfileError("not a profile: arrays or tables nested too deeply", path=path) from None
    return from_dict(data, path=path)


# -------------------------------------------------------------------------------------- validation


class _Reader:
    """Takes keys out of one TOML table, checking types; ``done()`` rejects what is left."""

    def __init__(self, data: Any, prefix: str, path: str):
        self.path = path
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ProfileError("must be a table", path=path, key=prefix.rstrip("."), allowed="a [table]",
                               value=data)
        self.data = dict(data)

    def key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def err(self, k: str, message: str, allowed: str | None, value: Any) -> ProfileError:
        return ProfileError(message, path=self.path, key=self.key(k), allowed=allowed, value=value)

    def take(self, k: str, typ: type | tuple[type, ...], *, required: bool = True, default: Any = None,
             allowed: str | None = None) -> Any:
        if k not in self.data:
            if required:
                raise ProfileError("is missing", path=self.path, key=self.key(k),
                                   allowed=allowed or _type_name(typ))
            return default
        v = self.data.pop(k)
        # bool is an int in Python: never accept one for the other
        ok = isinstance(v, typ) and not (isinstance(v, bool) and bool not in _as_tuple(typ))
        if not ok:
            raise self.err(k, f"must be {_type_name(typ)}", allowed, v)
        return v

    def table(self, k: str) -> _Reader:
        if k not in self.data:
            raise ProfileError("is missing", path=self.path, key=self.key(k), allowed="a [table]")
        return _Reader(self.data.pop(k), self.key(k) + ".", self.path)

    def optional_table(self, k: str) -> _Reader | None:
        return self.table(k) if k in self.data else None

    def done(self, known: tuple[str, ...]) -> None:
        for k in sorted(self.data):
            raise self.err(k, "unknown key", ", ".join(known), self.data[k])


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _type_name(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names.get(t, t.__name__) for t in _as_tuple(typ))


def _choice(r: _Reader, k: str, choices: tuple[str, ...], **kw: Any) -> str:
    v = r.take(k, str, allowed=", ".join(choices), **kw)
    if v not in choices:
        raise r.err(k, "is not a known value", ", ".join(choices), v)
    return v


def _int(r: _Reader, k: str, minimum: int, **kw: Any) -> int:
    v = r.take(k, int, allowed=f"an integer >= {minimum}", **kw)
    if v < minimum:
        raise r.err(k, f"must be >= {minimum}", f"an integer >= {minimum}", v)
    return v


def _providers(r: _Reader, k: str, allowed: tuple[str, ...], why: str = "") -> tuple[str, ...]:
    shown = ", ".join(allowed)
    v = r.take(k, list, allowed=f"a list of {shown}")
    for i, p in enumerate(v):
        if not isinstance(p, str):
            raise r.err(k, f"entry {i} must be a provider name (a string)", shown, p)
        if p not in ORT_PROVIDERS:
            raise r.err(k, f"entry {i} is not an ONNX Runtime execution provider", shown, p)
        if p not in allowed:
            raise r.err(k, f"entry {i} cannot be used here{why}", shown, p)
    if len(set(v)) != len(v):
        raise r.err(k, "lists a provider twice", shown, v)
    if not v or v[-1] != CPU:
        raise r.err(k, f"must end with {CPU}, the fallback every ONNX Runtime build has", shown, v)
    return tuple(v)


def from_dict(data: dict[str, Any], *, path: str = "<dict>") -> Profile:
    top = _Reader(data, "", path)
    version = top.take("schema_version", int, allowed=", ".join(map(str, SCHEMA_VERSIONS)))
    if version not in SCHEMA_VERSIONS:
        raise top.err("schema_version", "is not supported by this splitedge",
                      ", ".join(map(str, SCHEMA_VERSIONS)), version)
    name = top.take("name", str, allowed="lower-case letters, digits and '-'")
    if not _NAME.match(name):
        raise top.err("name", "is not a valid profile name", "lower-case letters, digits and '-'", name)
    description = top.take("description", str)
    notes = top.take("notes", str, required=False, default="")

    b = top.table("board")
    arch = _choice(b, "arch", ARCHES)
    python = b.take("python", str, allowed='"3.N", e.g. "3.11"')
    if not _PYTHON.match(python):
        raise b.err("python", "is not a Python version", '"3.N", e.g. "3.11"', python)
    board = Board(arch=arch, python=python, os=b.take("os", str, required=False, default=""))
    b.done(("arch", "python", "os"))

    o = top.table("ort")
    package = o.take("package", str)
    version_s = o.take("version", str, allowed='"X.Y.Z"')
    if not _VERSION.match(version_s):
        raise o.err("version", "is not a release version", '"X.Y.Z", e.g. "1.19.2"', version_s)
    source = _choice(o, "source", SOURCES)
    origin = o.take("origin", str)
    reqs = o.take("requirements", list, required=False, default=[])
    for i, line in enumerate(reqs):
        if not isinstance(line, str) or not line.strip() or "\n" in line:
            raise o.err("requirements", f"entry {i} must be one pip requirement line", "non-empty strings", line)
    build = o.take("build", str, required=False, default="")
    if source == "pypi" and not reqs:
        raise o.err("requirements", 'must name the wheel(s) when source = "pypi"', "pip requirement lines", reqs)
    if source == "source" and not build.strip():
        raise o.err("build", 'must give the build command line when source = "source"', "a command line", build)
    ort = OrtBuild(package=package, version=version_s, source=source, origin=origin, requirements=tuple(reqs),
                   build=build)
    o.done(("package", "version", "source", "origin", "requirements", "build"))

    p = top.table("providers")
    forward = _providers(p, "forward", ORT_PROVIDERS)
    training = _providers(p, "training", TRAINING_PROVIDERS,
                          " (ORT's training API runs on cpu or cuda only; TensorRT and CANN serve forward-only graphs)")
    p.done(("forward", "training"))

    tensorrt = TensorRTOptions()
    t = top.optional_table("tensorrt")
    if t is not None:
        if TENSORRT not in forward:
            raise ProfileError(f"is set but {TENSORRT} is not in providers.forward", path=path, key="tensorrt",
                               allowed=f"a [tensorrt] table only with {TENSORRT} in providers.forward")
        tensorrt = TensorRTOptions(
            fp16=t.take("fp16", bool, required=False, default=True),
            engine_cache=t.take("engine_cache", bool, required=False, default=True),
            engine_cache_dir=t.take("engine_cache_dir", str, required=False, default="trt-engines"),
        )
        if not tensorrt.engine_cache_dir.strip():
            raise t.err("engine_cache_dir", "must not be empty", "a directory", tensorrt.engine_cache_dir)
        t.done(("fp16", "engine_cache", "engine_cache_dir"))

    devices = {}
    for section, provider, lists in (("cuda", CUDA, forward + training), ("cann", CANN, forward)):
        d = top.optional_table(section)
        devices[section] = DeviceOptions()
        if d is None:
            continue
        if provider not in lists:
            where = "providers.forward or providers.training" if section == "cuda" else "providers.forward"
            raise ProfileError(f"is set but {provider} is not in {where}", path=path, key=section,
                               allowed=f"a [{section}] table only with {provider} in {where}")
        devices[section] = DeviceOptions(device_id=_int(d, "device_id", 0, required=False, default=0))
        d.done(("device_id",))

    rt = top.table("runtime")
    runtime = Runtime(threads=_int(rt, "threads", 0), batch_size=_int(rt, "batch_size", 1),
                      memory_budget_mb=_int(rt, "memory_budget_mb", 1))
    rt.done(("threads", "batch_size", "memory_budget_mb"))

    stacks = _stacks(top, path)

    top.done(("schema_version", "name", "description", "notes", "board", "ort", "providers", "tensorrt", "cuda",
              "cann", "runtime", "stack"))
    return Profile(schema_version=version, name=name, description=description, board=board, ort=ort,
                   forward=forward, training=training, runtime=runtime, tensorrt=tensorrt, cuda=devices["cuda"],
                   cann=devices["cann"], notes=notes, stacks=stacks, path=path)


_STACK_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*\Z")
_STACK_KEYS = ("name", "os", "python", "packages", "system", "inference", "forward", "backward", "usable", "why",
               "tested")


def _strings(r: _Reader, k: str, *, required: bool) -> tuple[str, ...]:
    v = r.take(k, list, required=required, default=[], allowed="a list of non-empty strings")
    for i, line in enumerate(v):
        if not isinstance(line, str) or not line.strip() or "\n" in line:
            raise r.err(k, f"entry {i} must be one non-empty line", "non-empty strings", line)
    return tuple(v)


def _stacks(top: _Reader, path: str) -> tuple[Stack, ...]:
    raw = top.take("stack", list, required=False, default=[], allowed="[[stack]] tables")
    out: list[Stack] = []
    for i, entry in enumerate(raw):
        r = _Reader(entry, f"stack[{i}].", path)
        name = r.take("name", str, allowed="lower-case letters, digits, '.' and '-'")
        if not _STACK_NAME.match(name):
            raise r.err("name", "is not a valid stack name", "lower-case letters, digits, '.' and '-'", name)
        if any(st.name == name for st in out):
            raise r.err("name", "names a stack twice", "a name used once", name)
        python = r.take("python", str, allowed='"3.N", e.g. "3.11"')
        if not _PYTHON.match(python):
            raise r.err("python", "is not a Python version", '"3.N", e.g. "3.11"', python)
        os_ = r.take("os", str)
        packages = _strings(r, "packages", required=True)
        if not packages:
            raise r.err("packages", "must name the runtime package(s)", "a list of non-empty strings", [])
        system = _strings(r, "system", required=False)
        places = {g: _choice(r, g, PLACES) for g in GRAPHS}
        usable = r.take("usable", bool)
        why = r.take("why", str)
        if not why.strip():
            raise r.err("why", "must say why the graphs run where they do", "a sentence", why)
        tested = r.take("tested", str, required=False, default="")
        r.done(_STACK_KEYS)
        out.append(Stack(name=name, os=os_, python=python, packages=packages, system=system, usable=usable, why=why,
                         tested=tested, **places))
    return tuple(out)
