"""``splitedge experiment`` config: loading and validating the TOML file into an :class:`Experiment`.

Every run of the grid is one real ``cloud-serve`` process and K real ``edge-train``
processes over TCP loopback (:mod:`splitedge.lab.launch`), each client on an emulated access
link (:mod:`splitedge.wire.shaping`). Runs execute one after the other; a run is *done* when
its ``result.json`` exists (written atomically, last), so rerunning the same command
skips finished runs and redoes interrupted or failed ones from scratch.

The config (TOML, validated strictly; every error exits with code 2 and names the key)::

    [experiment]                 # what every run shares (a [[group]] may override these)
    name = "papers"              # required; default output dir runs/experiments/<name>
    title = "..."                # optional, heads results.md
    out = "runs/experiments/papers"
    model = "resnet18"           # zoo model
    cut = 3                      # cut index or unit name
    data = "fashion-mnist"       # edge-train --data
    batch_size = 64
    lr = 0.02                    # edge (exported into the artifacts) and cloud
    momentum = 0.9               # cloud SGD momentum (the edge's ORT SGD has none)
    optimizer = "sgd"            # sgd | adamw, both sides
    eval_every = 40              # each client evaluates every N of its steps, and at the end
    eval_samples = 1000          # on the first N test samples (0: all)
    threads = 1                  # torch / ORT intra-op threads of every process
    fedavg_every = 0             # cloud-serve --fedavg-every
    latency = "20ms"             # one-way latency of every client's emulated link
    timeout_s = 3600             # a run taking longer fails
    target_accuracy = 0.75       # for "time to target" (not part of a run's identity)
    uq_bits = 4                  # uq reference for codecs without a bit width of their own

    [grid]                       # lists, crossed (a [[group]] may override each list)
    codecs = ["fp32", "uq:4", "sgq:4", {name = "randtopk", params = {rate = 0.05}, label = "randtopk 5%"}]
    partitions = ["iid", "dirichlet:0.5"]
    clients = [5]
    bandwidth = ["20mbit"]       # per client, both directions; "unlimited" for no shaping
    steps = [200]                # per client; or epochs = [1]
    seeds = [0]

    [[group]]                    # optional; without groups the [grid] is the one group
    name = "sgq"
    title = "SGQ against UQ, PQ, CLIO and fp32"
    codecs = ["fp32", "uq:4", "pq:4", "clio:4", "sgq:4"]
    partitions = ["iid"]

A codec entry is ``"name"``, ``"name:BITS"`` or an inline table ``{name, params, label}``;
gradients use the same codec and settings as the activations. Runs with identical
settings in several groups run once and are reported in each.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable


from ...codecs.spec import CodecSpec as _CodecSpec

RESULT_VERSION = 1  # of result.json and results.json

# ----------------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """A problem in the config file; the message names the table and the key."""


# keys of [experiment] that apply to every run (a [[group]] may override them), with defaults
RUN_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "cut": 3,
    "data": "fashion-mnist",
    "batch_size": 64,
    "lr": 0.02,
    "momentum": 0.9,
    "optimizer": "sgd",
    "eval_every": 40,
    "eval_samples": 1000,
    "threads": 1,
    "fedavg_every": 0,
    "latency": "0ms",
    "timeout_s": 3600.0,
    "target_accuracy": 0.75,
    "uq_bits": 4,
}
EXPERIMENT_ONLY = ("name", "title", "out")
# as written in a config: _build passes them through the same parsers as the config's own lists
GRID_DEFAULTS: dict[str, Any] = {
    "codecs": None,  # required
    "partitions": ["iid"],
    "clients": [5],
    "bandwidth": ["unlimited"],
    "steps": None,
    "epochs": None,  # one of steps / epochs is required
    "seeds": [0],
}
GROUP_ONLY = ("name", "title")
OPTIMIZERS = ("sgd", "adamw")
UNLIMITED = ("unlimited", "none")


@dataclass(frozen=True, init=False)
class CodecSpec(_CodecSpec):
    """One codec of the grid: a :class:`splitedge.codecs.CodecSpec` (name, sorted params) with a
    label for tables and plots."""

    label: str

    def __init__(self, name: str, params: Any = (), label: str = "") -> None:
        super().__init__(name, params)
        object.__setattr__(self, "label", label)

    @property
    def bits(self) -> int | None:
        return dict(self.params).get("bits")

    def slug(self) -> str:
        p = dict(self.params)
        s = self.name + (str(p.pop("bits")) if p.get("bits") is not None else "")
        for k, v in sorted(p.items()):
            s += f"_{k}{v}"
        return _slug(s)

    def identity(self) -> dict[str, Any]:
        return self.to_json()


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines what a run computes: its identity, hashed into its id."""

    model: str
    cut: int | str
    data: str
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    eval_every: int
    eval_samples: int
    threads: int
    fedavg_every: int
    latency: str
    codec: CodecSpec
    partition: str
    clients: int
    bandwidth: str | None  # None: unlimited
    steps: int | None
    epochs: int | None
    seed: int

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model, "cut": self.cut, "data": self.data, "batch_size": self.batch_size, "lr": self.lr,
            "momentum": self.momentum, "optimizer": self.optimizer, "eval_every": self.eval_every,
            "eval_samples": self.eval_samples, "threads": self.threads, "fedavg_every": self.fedavg_every,
            "latency": self.latency, "codec": self.codec.identity(), "partition": self.partition,
            "clients": self.clients, "bandwidth": self.bandwidth, "steps": self.steps, "epochs": self.epochs,
            "seed": self.seed,
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    @property
    def run_id(self) -> str:
        """Stable and filesystem-safe: readable settings plus a hash of the whole identity."""
        length = f"s{self.steps}" if self.steps else f"e{self.epochs}"
        part = self.partition.replace("dirichlet:", "dir")
        return "-".join([self.codec.slug(), _slug(part), f"c{self.clients}", _slug(self.bandwidth or "unlimited"),
                         length, f"seed{self.seed}", self.digest()[:8]])

    def setting(self) -> tuple:
        """What a table row shares with the other codecs of its table (everything but codec and seed)."""
        d = self.identity()
        d.pop("codec")
        d.pop("seed")
        return tuple(sorted((k, json.dumps(v)) for k, v in d.items()))

    def describe_setting(self) -> str:
        part = "IID" if self.partition == "iid" else f"Dirichlet({self.partition.split(':', 1)[1]})"
        link = f"{self.bandwidth} + {self.latency} links" if self.bandwidth else f"unlimited links, {self.latency}"
        length = f"{self.steps} steps" if self.steps else f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        return f"{part}, {self.clients} clients, {link}, {length} per client"

    def cloud_args(self) -> list[str]:
        args = ["--codec", self.codec.name]
        for k, v in self.codec.params:
            args += ["--bits", str(v)] if k == "bits" else ["--codec-param", f"{k}={json.dumps(v)}"]
        args += ["--optimizer", self.optimizer, "--lr", repr(self.lr), "--threads", str(self.threads),
                 "--seed", str(self.seed), "--log-every", "100"]
        if self.optimizer == "sgd":
            args += ["--momentum", repr(self.momentum)]
        if self.fedavg_every:
            args += ["--fedavg-every", str(self.fedavg_every)]
        return args

    def edge_args(self) -> list[str]:
        args = ["--data", self.data, "--partition", self.partition, "--batch-size", str(self.batch_size),
                "--eval-every", str(self.eval_every), "--eval-samples", str(self.eval_samples),
                "--threads", str(self.threads), "--seed", str(self.seed), "--latency", self.latency,
                "--log-every", "50"]
        if self.bandwidth:
            args += ["--bandwidth", self.bandwidth]
        args += ["--steps", str(self.steps)] if self.steps else ["--epochs", str(self.epochs)]
        return args


@dataclass(frozen=True)
class Group:
    name: str
    title: str
    runs: tuple[RunConfig, ...]
    codecs: tuple[CodecSpec, ...]
    target_accuracy: float
    uq_bits: int
    timeout_s: float


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    out: Path
    groups: tuple[Group, ...]
    source: Path
    text: str = field(repr=False, default="")

    def runs(self) -> list[tuple[RunConfig, float]]:
        """Unique runs in config order, with their timeout (the largest of their groups')."""
        seen: dict[str, tuple[RunConfig, float]] = {}
        for g in self.groups:
            for r in g.runs:
                old = seen.get(r.run_id)
                seen[r.run_id] = (r, max(g.timeout_s, old[1] if old else 0.0))
        return list(seen.values())


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(s)).strip("_") or "x"


def _known(where: str, keys: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for k in keys:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}; known keys: {', '.join(allowed)}")


def _int(where: str, v: Any, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: must be an integer, got {v!r}")
    if v < lo:
        raise ConfigError(f"{where}: must be >= {lo}, got {v}")
    return v


def _float(where: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where}: must be a number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{where}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {v}")
    return v


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where}: must be a non-empty string, got {v!r}")
    return v.strip()


def _list(where: str, v: Any) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where}: must be a non-empty list, got {v!r}")
    return v


def parse_codec(where: str, entry: Any) -> CodecSpec:
    """``"sgq:4"``, ``"fp32"`` or ``{name = "randtopk", params = {rate = 0.05}, label = "..."}``."""
    from ... import codecs as sc

    if isinstance(entry, str):
        name, sep, bits = entry.strip().partition(":")
        params: dict[str, Any] = {}
        if sep:
            try:
                params["bits"] = int(bits)
            except ValueError:
                raise ConfigError(f"{where}: {entry!r}: write NAME or NAME:BITS (e.g. sgq:4)") from None
        label = entry.strip()
    elif isinstance(entry, dict):
        _known(where, entry, ("name", "params", "label"))
        if "name" not in entry:
            raise ConfigError(f"{where}: a codec table needs 'name'")
        name = _str(f"{where}.name", entry["name"])
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params: must be a table of codec parameters, got {params!r}")
        label = _str(f"{where}.label", entry["label"]) if "label" in entry else None  # type: ignore[assignment]
        if label is None:
            label = name + "".join(f":{v}" if k == "bits" else f" {k}={v}" for k, v in sorted(params.items()))
    else:
        raise ConfigError(f"{where}: a codec is 'NAME', 'NAME:BITS' or a table, got {entry!r}")
    if name not in sc.available():
        raise ConfigError(f"{where}: unknown codec {name!r}; available: {', '.join(sc.available())}")
    if "bits" in params and "bits" not in sc.get(name).params:
        takes = ", ".join(sc.get(name).params) or "no parameters"
        raise ConfigError(f"{where}: codec {name!r} takes no bits (its parameters: {takes})")
    try:
        sc.get(name, **params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return CodecSpec(name, params, label)


def _partition(where: str, v: Any) -> str:
    from ...runtime_edge.data import parse_scheme

    v = _str(where, v)
    try:
        parse_scheme(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


def _bandwidth(where: str, v: Any) -> str | None:
    from ...wire.shaping import parse_rate

    v = _str(where, v)
    if v.lower() in UNLIMITED:
        return None
    try:
        parse_rate(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (or 'unlimited')") from None
    return v


def _run_settings(where: str, raw: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Validates the run keys present in ``raw`` and returns ``base`` updated with them."""
    from ...runtime_edge import data as D
    from ...wire.shaping import parse_duration

    out = dict(base)
    for k, v in raw.items():
        if k not in RUN_DEFAULTS:
            continue
        w = f"{where} {k}"
        if k == "model":
            from ...export.zoo_names import MODEL_NAMES

            out[k] = _str(w, v)
            if out[k] not in MODEL_NAMES:
                raise ConfigError(f"{w}: unknown model {out[k]!r}; available: {', '.join(MODEL_NAMES)}")
        elif k == "cut":
            out[k] = _int(w, v, 1) if not isinstance(v, str) else _str(w, v)
        elif k == "data":
            out[k] = _str(w, v)
            try:
                D.parse_spec(out[k])
            except (D.DatasetError, ValueError) as e:
                raise ConfigError(f"{w}: {e}") from None
        elif k in ("batch_size",):
            out[k] = _int(w, v, 1)
        elif k in ("eval_every", "eval_samples", "fedavg_every"):
            out[k] = _int(w, v, 0)
        elif k == "threads":
            out[k] = _int(w, v, 1)
        elif k == "lr":
            out[k] = _float(w, v, 0.0, lo_open=True)
        elif k == "momentum":
            out[k] = _float(w, v, 0.0, 1.0)
        elif k == "optimizer":
            if v not in OPTIMIZERS:
                raise ConfigError(f"{w}: must be one of {', '.join(OPTIMIZERS)}, got {v!r}")
            out[k] = v
        elif k == "latency":
            out[k] = _str(w, v)
            try:
                parse_duration(out[k])
            except ValueError as e:
                raise ConfigError(f"{w}: {e}") from None
        elif k == "timeout_s":
            out[k] = _float(w, v, 0.0, lo_open=True)
        elif k == "target_accuracy":
            out[k] = _float(w, v, 0.0, 1.0, lo_open=True)
        elif k == "uq_bits":
            out[k] = _int(w, v, 1)
            if out[k] > 8:
                raise ConfigError(f"{w}: must be <= 8, got {out[k]}")
    if "model" in raw or "cut" in raw:  # a cut is checked against the model it ends up with
        from ...export.zoo_names import check_cut

        try:
            check_cut(out["model"], out["cut"])
        except ValueError as e:
            raise ConfigError(f"{where} cut (model {out['model']}): {e}") from None
    return out


def _grid_lists(where: str, raw: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    if "steps" in raw or "epochs" in raw:  # one replaces the other
        out["steps"] = out["epochs"] = None
    for k, v in raw.items():
        if k not in GRID_DEFAULTS:
            continue
        w = f"{where} {k}"
        items = _list(w, v)
        if k == "codecs":
            out[k] = [parse_codec(f"{w}[{i}]", x) for i, x in enumerate(items)]
            labels = Counter(c.label for c in out[k])
            dup = [lab for lab, n in labels.items() if n > 1]
            if dup:
                raise ConfigError(f"{w}: codec {dup[0]!r} listed twice")
        elif k == "partitions":
            out[k] = [_partition(f"{w}[{i}]", x) for i, x in enumerate(items)]
        elif k == "clients":
            out[k] = [_int(f"{w}[{i}]", x, 1) for i, x in enumerate(items)]
        elif k == "bandwidth":
            out[k] = [_bandwidth(f"{w}[{i}]", x) for i, x in enumerate(items)]
        elif k in ("steps", "epochs"):
            out[k] = [_int(f"{w}[{i}]", x, 1) for i, x in enumerate(items)]
        elif k == "seeds":
            out[k] = [_int(f"{w}[{i}]", x, 0) for i, x in enumerate(items)]
    if "steps" in raw and "epochs" in raw:
        raise ConfigError(f"{where}: give steps or epochs, not both")
    return out


def _check_data_dir(where: str, data: str) -> None:
    """A data spec that names a directory must name an existing one (cheap: nothing is read)."""
    from ...runtime_edge import data as D

    spec = D.parse_spec(data)
    if spec.path is not None and not Path(spec.path).expanduser().is_dir():
        how = {"fashion-mnist": D.FASHION_MNIST_HELP, "mnist": D.MNIST_HELP, "idx": D.IDX_HELP,
               "cifar10": D.CIFAR10_HELP, "folder": D.FOLDER_HELP}.get(spec.kind)
        raise ConfigError(f"{where}: {data!r}: directory {spec.path} not found" + (f". {how}" if how else ""))


def load_config(path: str | os.PathLike[str], out: str | None = None, check_data: bool = True) -> Experiment:
    """Reads and validates a config file; :class:`ConfigError` names the problem.

    ``check_data=False`` skips the check that data directories exist (:func:`_check_data_dir`).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          "a TOML config must be UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    try:
        return _build(doc, p, text, out, check_data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _build(doc: dict[str, Any], path: Path, text: str, out_override: str | None,
           check_data: bool = True) -> Experiment:
    _known("top level", doc, ("experiment", "grid", "group"))
    exp = doc.get("experiment")
    if not isinstance(exp, dict):
        raise ConfigError("an [experiment] table is required (with at least name = \"...\")")
    _known("[experiment]", exp, (*EXPERIMENT_ONLY, *RUN_DEFAULTS))
    if "name" not in exp:
        raise ConfigError("[experiment]: 'name' is required")
    name = _str("[experiment] name", exp["name"])
    if _slug(name) != name:
        raise ConfigError(f"[experiment] name: use letters, digits and . _ + - only, got {name!r}")
    title = _str("[experiment] title", exp["title"]) if "title" in exp else name
    out = Path(out_override or (_str("[experiment] out", exp["out"]) if "out" in exp else f"runs/experiments/{name}"))
    run_base = _run_settings("[experiment]", exp, RUN_DEFAULTS)

    grid = doc.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError("[grid] must be a table")
    _known("[grid]", grid, GRID_DEFAULTS)
    # the defaults are parsed like explicit lists: an omitted bandwidth is exactly "unlimited" (None)
    defaults = _grid_lists("defaults", {k: v for k, v in GRID_DEFAULTS.items() if v is not None}, GRID_DEFAULTS)
    grid_base = _grid_lists("[grid]", grid, defaults)

    raw_groups = doc.get("group")
    if raw_groups is None:
        raw_groups = [{"name": name, "title": title}]
    if not isinstance(raw_groups, list) or not raw_groups:
        raise ConfigError("'group' must be an array of tables: write [[group]] blocks")
    groups = []
    names: set[str] = set()
    for i, g in enumerate(raw_groups):
        if not isinstance(g, dict):
            raise ConfigError(f"[[group]] #{i + 1}: must be a table")
        where = f"[[group]] #{i + 1}"
        _known(where, g, (*GROUP_ONLY, *RUN_DEFAULTS, *GRID_DEFAULTS))
        if "name" not in g:
            raise ConfigError(f"{where}: 'name' is required")
        gname = _str(f"{where} name", g["name"])
        if _slug(gname) != gname:
            raise ConfigError(f"{where} name: use letters, digits and . _ + - only, got {gname!r}")
        if gname in names:
            raise ConfigError(f"{where}: group name {gname!r} used twice")
        names.add(gname)
        where = f"[[group]] {gname!r}"
        settings = _run_settings(where, g, run_base)
        if check_data:
            _check_data_dir(f"{where} data" if "data" in g else "[experiment] data" if "data" in exp
                            else "[experiment] data (default)", settings["data"])
        lists = _grid_lists(where, g, grid_base)
        if not lists["codecs"]:
            raise ConfigError(f"{where}: no codecs: give codecs = [...] in [grid] or in the group")
        if not lists["steps"] and not lists["epochs"]:
            raise ConfigError(f"{where}: give steps = [...] or epochs = [...] (per client) in [grid] or in the group")
        runs = []
        for part in lists["partitions"]:
            for k in lists["clients"]:
                for bw in lists["bandwidth"]:
                    for length in lists["steps"] or lists["epochs"]:
                        for codec in lists["codecs"]:
                            for seed in lists["seeds"]:
                                runs.append(RunConfig(
                                    model=settings["model"], cut=settings["cut"], data=settings["data"],
                                    batch_size=settings["batch_size"], lr=settings["lr"],
                                    momentum=settings["momentum"], optimizer=settings["optimizer"],
                                    eval_every=settings["eval_every"], eval_samples=settings["eval_samples"],
                                    threads=settings["threads"], fedavg_every=settings["fedavg_every"],
                                    latency=settings["latency"], codec=codec, partition=part, clients=k,
                                    bandwidth=bw, steps=length if lists["steps"] else None,
                                    epochs=length if not lists["steps"] else None, seed=seed))
        groups.append(Group(gname, _str(f"{where} title", g["title"]) if "title" in g else gname, tuple(runs),
                            tuple(lists["codecs"]), settings["target_accuracy"], settings["uq_bits"],
                            settings["timeout_s"]))
    return Experiment(name, title, out, tuple(groups), path, text)
