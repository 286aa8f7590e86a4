"""``splitedge experiment CONFIG.toml``: a grid of real split-training runs, a table and plots.

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

Outputs in the output directory (created with a ``.splitedge-experiment`` marker; a non-empty
directory without one is refused, unless it is an older output of this command, see
:func:`check_out_dir`):

* ``runs/<run id>/``: the processes' commands, logs, ``cloud-metrics.jsonl``, the clients'
  summaries ``edge-<i>.json``, ``settings.json``, this run's ``evals.jsonl``, its TensorBoard
  scalars in ``tensorboard/`` (``tensorboard --logdir OUT/runs`` compares the runs) and, when done,
  ``result.json``;
* ``evals.jsonl``: one line per evaluation point of every finished run (see
  :func:`eval_points` for the fields);
* ``results.md`` and ``results.json``: per group and setting, one row per codec (see
  :func:`build_report`);
* ``plots/<group>-accuracy-time.png``, ``<group>-accuracy-traffic.png``,
  ``<group>-bytes-per-step.png``.

matplotlib (Agg backend) is imported only when the plots are drawn.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import tomllib
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from ..codecs.spec import CodecSpec as _CodecSpec
from ..errors import FiniteFloat, UserError

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
    from .. import codecs as sc

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
    from ..runtime_edge.data import parse_scheme

    v = _str(where, v)
    try:
        parse_scheme(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


def _bandwidth(where: str, v: Any) -> str | None:
    from ..wire.shaping import parse_rate

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
    from ..runtime_edge import data as D
    from ..wire.shaping import parse_duration

    out = dict(base)
    for k, v in raw.items():
        if k not in RUN_DEFAULTS:
            continue
        w = f"{where} {k}"
        if k == "model":
            from ..export.zoo_names import MODEL_NAMES

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
        from ..export.zoo_names import check_cut

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
    from ..runtime_edge import data as D

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


# ----------------------------------------------------------------------------------- one run


def _artifacts(exp_out: Path, run: RunConfig, log: Callable[[str], None]) -> Path:
    """Exports the edge/cloud halves once per (model, cut, input shape, classes, optimizer, lr)."""
    from ..export import onnx_export as oe
    from ..runtime_edge import data as D

    ds = D.load(run.data, split="test")
    key = {"model": run.model, "cut": run.cut, "input_shape": list(ds.input_shape), "num_classes": ds.num_classes,
           "optimizer": run.optimizer, "lr": run.lr}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    out = exp_out / "artifacts" / f"{_slug(run.model)}-cut{_slug(str(run.cut))}-{digest}"
    if (out / "manifest.json").exists():
        return out
    log(f"exporting {run.model} cut {run.cut} for {'x'.join(map(str, ds.input_shape))} inputs, "
        f"{ds.num_classes} classes, {run.optimizer} lr {run.lr} -> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    oe.export(oe.ExportRequest(run.model, run.cut, input_shape=tuple(ds.input_shape), num_classes=ds.num_classes,
                               optimizer=run.optimizer, lr=run.lr, out=str(out)))
    return out


def _cumulative(events: list[dict[str, Any]], key: Callable[[dict], int]) -> dict[int, tuple[list[int], list[int]]]:
    """Per client: (sorted steps, cumulative ``key`` up to and including each)."""
    per: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        per.setdefault(int(e["client"]), []).append((int(e["step"]), key(e)))
    out = {}
    for c, items in per.items():
        items.sort()
        steps, cum, total = [], [], 0
        for s, v in items:
            total += v
            steps.append(s)
            cum.append(total)
        out[c] = (steps, cum)
    return out


def _upto(table: tuple[list[int], list[int]] | None, step: int) -> int:
    if table is None:
        return 0
    i = bisect_right(table[0], step)
    return table[1][i - 1] if i else 0


def eval_points(summaries: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's evaluation points, one per step at which clients evaluated, in step order.

    * ``step``: the clients' own step count at the evaluation (every client evaluates at
      the same steps: every ``eval_every`` and at its last step);
    * ``clients_reporting``: how many clients evaluated at that step (all of them, unless
      their step counts differ, as with ``epochs`` on unequal shards);
    * ``accuracy``, ``loss``: mean over the reporting clients; ``accuracy_per_client``: one
      entry per client id (``None`` where it did not evaluate at that step);
    * ``time_s``: mean over the reporting clients of the seconds since the client started
      training (``edge-train``'s ``time_s``); ``train_time_s``: the same minus the client's
      own evaluation time so far (its ``eval_s`` summed), the time axis of the plots and of
      time-to-target;
    * ``payload_bytes``: activation + gradient payload bytes of the training steps up to
      this step, summed over all clients (from the cloud's step metrics);
      ``fp32_payload_bytes``: what fp32 payloads of the same tensors would have been;
    * ``wire_bytes``: bytes sent + received by the reporting clients so far (every ZeroMQ
      frame: training, evaluation, FedAvg, heartbeats), from ``edge-train``'s counters.
    """
    steps = [e for e in events if e.get("event") == "step"]
    payload = _cumulative(steps, lambda e: int(e["payload_in"]) + int(e["payload_out"]))
    fp32 = _cumulative(steps, lambda e: 2 * codec_payload_size("fp32", {}, e["shape"]))
    by_step: dict[int, dict[int, dict[str, Any]]] = {}
    for cid, s in enumerate(summaries):
        spent = 0.0
        for ev in s["evals"]:
            spent += float(ev.get("eval_s") or 0.0)
            by_step.setdefault(int(ev["step"]), {})[cid] = {**ev, "train_time_s": float(ev["time_s"]) - spent}
    points = []
    k = len(summaries)
    for step in sorted(by_step):
        got = by_step[step]
        n = len(got)
        points.append({
            "step": step, "clients_reporting": n,
            "accuracy": sum(e["accuracy"] for e in got.values()) / n,
            "accuracy_per_client": [got[c]["accuracy"] if c in got else None for c in range(k)],
            "loss": sum(e["loss"] for e in got.values()) / n,
            "time_s": round(sum(e["time_s"] for e in got.values()) / n, 3),
            "train_time_s": round(sum(e["train_time_s"] for e in got.values()) / n, 3),
            "payload_bytes": sum(_upto(payload.get(c), step) for c in range(k)),
            "fp32_payload_bytes": sum(_upto(fp32.get(c), step) for c in range(k)),
            "wire_bytes": sum(int(e["bytes_sent"]) + int(e["bytes_received"]) for e in got.values()),
        })
    return points


def summarize(run: RunConfig, summaries: list[dict[str, Any]], events: list[dict[str, Any]],
              wall_s: float) -> dict[str, Any]:
    """A finished run's ``result.json``."""
    from . import launch

    steps = [e for e in events if e.get("event") == "step"]
    traffic = launch.traffic(events)
    shapes = Counter(tuple(e["shape"]) for e in steps)
    return {
        "version": RESULT_VERSION, "run": run.run_id, "settings": run.identity(), "label": run.codec.label,
        "wall_s": round(wall_s, 3),
        "final_accuracy": sum(s["final_accuracy"] for s in summaries) / len(summaries),
        "final_accuracy_per_client": [s["final_accuracy"] for s in summaries],
        "steps_per_client": [s["steps"] for s in summaries],
        "traffic": traffic,
        "payload_bytes_per_step": traffic["payload_bytes"] / traffic["steps"] if traffic["steps"] else None,
        "shapes": [[list(s), n] for s, n in sorted(shapes.items())],
        "errors": sum(1 for e in events if e.get("event") == "error"),
        "clients": [{k: s.get(k) for k in ("client_id", "final_accuracy", "final_loss", "steps", "samples",
                                            "shard_samples", "bytes_sent", "bytes_received", "wall_time_s", "link",
                                            "timings", "train_accuracy")} for s in summaries],
        "points": eval_points(summaries, events),
    }


def _point_lines(run: RunConfig, result: dict[str, Any]) -> list[dict[str, Any]]:
    """evals.jsonl lines of one run: the run's settings, then the point."""
    c = run.codec
    head = {"run": run.run_id, "codec": c.label, "codec_name": c.name, "codec_params": dict(c.params),
            "bits": c.bits, "partition": run.partition, "clients": run.clients,
            "bandwidth": run.bandwidth or "unlimited", "latency": run.latency, "seed": run.seed,
            "steps_planned": run.steps, "epochs_planned": run.epochs}
    order = ("step", "clients_reporting", "accuracy", "accuracy_per_client", "loss", "time_s", "train_time_s",
             "payload_bytes", "fp32_payload_bytes", "wire_bytes")
    return [{**head, **{k: p[k] for k in order}, **{k: v for k, v in p.items() if k not in order}}
            for p in result["points"]]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    from ..fsutil import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode())


_ACC_LINE = re.compile(r"client (\d+) step (\d+): test accuracy ([0-9.]+)%")


class _Ticker:
    """Progress of a running run: steps from the cloud's metrics, accuracy from the edge logs."""

    def __init__(self, run: RunConfig, workdir: Path, echo: Callable[[str], None], every_s: float):
        self.run, self.wd, self.echo, self.every = run, workdir, echo, every_s
        self.t0 = time.monotonic()
        self.last = self.t0

    def __call__(self, events: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        per: dict[int, int] = {}
        loss = None
        for e in events:
            if e.get("event") == "step":
                per[e["client"]] = max(per.get(e["client"], 0), e["step"])
                loss = e["loss"]
        mean = sum(per.values()) / max(1, self.run.clients)
        planned = f"/{self.run.steps}" if self.run.steps else ""
        acc = self._last_accuracy()
        self.echo(f"      {now - self.t0:5.0f}s  step {mean:.0f}{planned} (mean over clients)"
                  + (f", loss {loss:.3f}" if loss is not None else "")
                  + (f", last test accuracy {acc}" if acc else ""))

    def _last_accuracy(self) -> str | None:
        best: tuple[int, int, float] | None = None
        for log in sorted(self.wd.glob("edge-*.log")):
            try:
                for line in log.read_text(errors="replace").splitlines()[-200:]:
                    m = _ACC_LINE.search(line)
                    if m:
                        cand = (int(m.group(2)), int(m.group(1)), float(m.group(3)))
                        if best is None or cand[0] > best[0]:
                            best = cand
            except OSError:
                continue
        return f"{best[2]:.1f}% (client {best[1]} at step {best[0]})" if best else None


def run_dir(out: Path, run: RunConfig) -> Path:
    return out / "runs" / run.run_id


def load_result(out: Path, run: RunConfig) -> dict[str, Any] | None:
    """The run's result if it finished (with these exact settings), else None."""
    path = run_dir(out, run) / "result.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if r.get("version") != RESULT_VERSION or r.get("settings") != run.identity():
        return None
    return r


def execute(out: Path, run: RunConfig, artifacts: Path, timeout_s: float, echo: Callable[[str], None],
            tick_s: float = 30.0) -> dict[str, Any]:
    """Runs one grid point from scratch (a partial directory is deleted first); returns its result."""
    from . import launch
    from ..fsutil import atomic_write_json

    wd = run_dir(out, run)
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    atomic_write_json(wd / "settings.json", {"run": run.run_id, "settings": run.identity(),
                                             "artifacts": str(artifacts), "timeout_s": timeout_s})
    # TensorBoard scalars per run: `tensorboard --logdir OUT/runs` shows every run side by side
    spec = launch.RunSpec(wd, artifacts, run.clients, run.cloud_args() + ["--tensorboard", str(wd / "tensorboard")],
                          run.edge_args(), env={"OMP_NUM_THREADS": str(run.threads)}, timeout_s=timeout_s)
    res = launch.run(spec, on_tick=_Ticker(run, wd, echo, tick_s))
    result = summarize(run, res.summaries, res.metrics(), res.wall_s)
    _write_jsonl(wd / "evals.jsonl", _point_lines(run, result))
    atomic_write_json(wd / "result.json", result)  # last: marks the run done
    return result


# ----------------------------------------------------------------------------------- report


_SIZES: dict[tuple, int] = {}


def codec_payload_size(name: str, params: dict[str, Any], shape: Iterable[int]) -> int:
    """The payload size of a codec whose size depends only on the shape (fp32, fp16, uq)."""
    import numpy as np

    from .. import codecs as sc

    key = (name, tuple(sorted(params.items())), tuple(shape))
    if key not in _SIZES:
        _SIZES[key] = len(sc.get(name, **params).encode(np.zeros(key[2], dtype=np.float32)))
    return _SIZES[key]


def uq_payload_bytes(shapes: list[list], bits: int) -> int:
    """Activation + gradient payload bytes that ``uq`` at ``bits`` would send for these tensors
    (``shapes``: [[shape, steps], ...])."""
    return sum(2 * n * codec_payload_size("uq", {"bits": bits}, shape) for shape, n in shapes)


def time_to_target(points: list[dict[str, Any]], target: float, clients: int) -> dict[str, Any] | None:
    """The first evaluation point (all clients reporting) whose mean accuracy reaches ``target``."""
    for p in points:
        if p["clients_reporting"] == clients and p["accuracy"] >= target:
            return {"train_time_s": p["train_time_s"], "time_s": p["time_s"], "step": p["step"],
                    "payload_bytes": p["payload_bytes"]}
    return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def build_report(exp: Experiment, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json: per group, per setting (everything but codec and seed), one row per codec.

    A row averages its finished seeds: ``final_accuracy`` (mean over clients, then seeds),
    ``gap_to_fp32`` (row minus the fp32 row of the same setting, in accuracy points),
    ``payload_bytes_per_step`` (activation + gradient payload bytes per client step),
    ``reduction_vs_fp32`` (fp32 payload bytes of the same tensors / this row's),
    ``reduction_vs_uq`` (uq payload bytes at ``uq_bits_used`` for the same tensors / this
    row's; ``uq_bits_used`` = the codec's bits, or the group's ``uq_bits`` for codecs without),
    ``time_to_target_s`` (train_time_s of the first evaluation point at or above the
    target, mean over seeds; None unless every seed reached it), ``steps_to_target``,
    ``payload_bytes_to_target``.
    """
    groups = []
    for g in exp.groups:
        settings: dict[tuple, list[RunConfig]] = {}
        for r in g.runs:
            settings.setdefault(r.setting(), []).append(r)
        tables = []
        for key, runs in settings.items():
            rows = []
            for codec in g.codecs:
                mine = [r for r in runs if r.codec == codec]
                done = [(r, results[r.run_id]) for r in mine if r.run_id in results]
                row: dict[str, Any] = {"codec": codec.label, "codec_name": codec.name, "codec_params": dict(codec.params),
                                       "runs": [r.run_id for r, _ in done], "missing": [r.run_id for r in mine
                                                                                        if r.run_id not in results]}
                if done:
                    bits = codec.bits if codec.bits is not None else g.uq_bits
                    ttt = [time_to_target(res["points"], g.target_accuracy, r.clients) for r, res in done]
                    reached = [t for t in ttt if t is not None]
                    payload = sum(res["traffic"]["payload_bytes"] for _, res in done)
                    row.update({
                        "seeds": [r.seed for r, _ in done],
                        "final_accuracy": _mean([res["final_accuracy"] for _, res in done]),
                        "payload_bytes_per_step": payload / sum(res["traffic"]["steps"] for _, res in done),
                        "reduction_vs_fp32": sum(res["traffic"]["fp32_payload_bytes"] for _, res in done) / payload,
                        "uq_bits_used": bits,
                        "reduction_vs_uq": sum(uq_payload_bytes(res["shapes"], bits) for _, res in done) / payload,
                        "target_reached": len(reached), "time_to_target_s": None, "steps_to_target": None,
                        "payload_bytes_to_target": None,
                        "wall_s": _mean([res["wall_s"] for _, res in done]),
                    })
                    if reached and len(reached) == len(done):
                        row["time_to_target_s"] = _mean([t["train_time_s"] for t in reached])
                        row["steps_to_target"] = _mean([t["step"] for t in reached])
                        row["payload_bytes_to_target"] = _mean([t["payload_bytes"] for t in reached])
                rows.append(row)
            ref = next((x for x in rows if x["codec_name"] == "fp32" and not x["codec_params"]
                        and "final_accuracy" in x), None)
            for x in rows:
                x["gap_to_fp32"] = (100 * (x["final_accuracy"] - ref["final_accuracy"])
                                    if ref is not None and "final_accuracy" in x else None)
            tables.append({"setting": dict((k, json.loads(v)) for k, v in key), "describe": runs[0].describe_setting(),
                           "rows": rows})
        groups.append({"name": g.name, "title": g.title, "target_accuracy": g.target_accuracy, "uq_bits": g.uq_bits,
                       "tables": tables})
    return {"version": RESULT_VERSION, "experiment": exp.name, "title": exp.title, "config": str(exp.source),
            "groups": groups}


def fmt_kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB"


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def render_markdown(exp: Experiment, report: dict[str, Any], failed: list[dict[str, Any]]) -> str:
    lines = [f"# {exp.title}", "",
             f"Config `{exp.source}`; generated by `splitedge experiment` on {_machine()}.", "",
             "Columns: final test accuracy (mean over clients and seeds); gap to the fp32 row of the same table, "
             "in points; payload bytes per client step (activation + gradient, from the cloud's metrics); how many "
             "times fewer bytes than fp32 and than uq at the codec's bits (`uq_bits` for codecs without) would "
             "send for the same tensors; training time (evaluations excluded, mean over clients), steps and "
             "payload until the mean test accuracy first reached the target at an evaluation point.", ""]
    for g in report["groups"]:
        tgt = 100 * g["target_accuracy"]
        lines += [f"## {g['title']}", ""]
        for t in g["tables"]:
            lines += [f"### {t['describe']}", "",
                      f"| codec | final acc. | gap to fp32 | bytes/step | vs fp32 | vs uq | time to {tgt:g}% | "
                      f"steps to {tgt:g}% | traffic to {tgt:g}% | run wall time |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for x in t["rows"]:
                if "final_accuracy" not in x:
                    lines.append(f"| {x['codec']} | not run | | | | | | | | |")
                    continue
                gap = f"{x['gap_to_fp32']:+.2f}" if x["gap_to_fp32"] is not None else "—"
                if x["time_to_target_s"] is not None:
                    ttt, stt, btt = (f"{x['time_to_target_s']:.0f} s", f"{x['steps_to_target']:.0f}",
                                     fmt_mb(x["payload_bytes_to_target"]))
                else:
                    ttt = "not reached" + (f" ({x['target_reached']}/{len(x['runs'])})" if x["target_reached"] else "")
                    stt = btt = "—"
                lines.append(f"| {x['codec']} | {100 * x['final_accuracy']:.2f}% | {gap} | "
                             f"{fmt_kb(x['payload_bytes_per_step'])} | {x['reduction_vs_fp32']:.1f}× | "
                             f"{x['reduction_vs_uq']:.2f}× (uq{x['uq_bits_used']}) | {ttt} | {stt} | {btt} | "
                             f"{x['wall_s']:.0f} s |")
            lines.append("")
        lines += [f"![accuracy vs time](plots/{g['name']}-accuracy-time.png)",
                  f"![accuracy vs traffic](plots/{g['name']}-accuracy-traffic.png)",
                  f"![bytes per step](plots/{g['name']}-bytes-per-step.png)", ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"* `{f['run']}`: {f['error'].splitlines()[0]}" for f in failed] + [""]
    return "\n".join(lines)


def draw_plots(exp: Experiment, report: dict[str, Any], results: dict[str, dict[str, Any]], plot_dir: Path) -> list[Path]:
    """Three PNGs per group; one panel per table (setting), one colour per codec, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cmap = plt.get_cmap("tab10")
    for g, gr in zip(exp.groups, report["groups"]):
        colors = {c.label: cmap(i % 10) for i, c in enumerate(g.codecs)}
        n = len(gr["tables"])
        for kind in ("accuracy-time", "accuracy-traffic", "bytes-per-step"):
            fig, axes = plt.subplots(1, n, figsize=(6.2 * n, 4.4), squeeze=False)
            for ax, table in zip(axes[0], gr["tables"]):
                ax.set_title(table["describe"], fontsize=8.5)
                if kind == "bytes-per-step":
                    rows = [x for x in table["rows"] if "payload_bytes_per_step" in x]
                    vals = [x["payload_bytes_per_step"] / 1000 for x in rows]
                    bars = ax.bar(range(len(rows)), vals, color=[colors[x["codec"]] for x in rows])
                    ax.set_yscale("log")
                    ax.set_xticks(range(len(rows)), [x["codec"] for x in rows], rotation=30, ha="right", fontsize=8)
                    ax.set_ylabel("payload kB per client step (activation + gradient)")
                    for b, v, x in zip(bars, vals, rows):
                        ax.annotate(f"{v:,.0f} kB\n{x['reduction_vs_fp32']:.0f}× < fp32", (b.get_x() + b.get_width() / 2, v),
                                    ha="center", va="bottom", fontsize=7)
                    if vals:
                        ax.set_ylim(min(vals) / 2, max(vals) * 4)
                    continue
                for x in table["rows"]:
                    for i, rid in enumerate(x["runs"]):
                        pts = results[rid]["points"]
                        if kind == "accuracy-time":
                            xs = [p["train_time_s"] for p in pts]
                        else:
                            xs = [p["payload_bytes"] / 1e6 for p in pts]
                        ax.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", ms=3, color=colors[x["codec"]],
                                label=x["codec"] if i == 0 else None)
                ax.axhline(100 * g.target_accuracy, color="grey", ls="--", lw=0.8)
                ax.set_ylabel("test accuracy, % (mean over clients)")
                if kind == "accuracy-time":
                    ax.set_xlabel("training time, s (evaluations excluded, mean over clients)")
                else:
                    ax.set_xscale("log")
                    ax.set_xlabel("cumulative payload, MB (all clients, both directions; log)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(g.title, fontsize=10)
            fig.tight_layout()
            path = plot_dir / f"{g.name}-{kind}.png"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
            fig.savefig(tmp, dpi=110)
            plt.close(fig)
            os.replace(tmp, path)
            written.append(path)
    return written


def write_outputs(exp: Experiment, failed: list[dict[str, Any]], plots: bool = True) -> dict[str, Any]:
    """evals.jsonl, results.json, results.md (and the plots) from every finished run."""
    from ..fsutil import atomic_write_bytes, atomic_write_json

    results: dict[str, dict[str, Any]] = {}
    lines: list[dict[str, Any]] = []
    for run, _ in exp.runs():
        r = load_result(exp.out, run)
        if r is not None:
            results[run.run_id] = r
            lines += _point_lines(run, r)
    exp.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(exp.out / "evals.jsonl", lines)
    report = build_report(exp, results)
    report["failed"] = failed
    report["machine"] = _machine()
    atomic_write_json(exp.out / "results.json", report)
    atomic_write_bytes(exp.out / "results.md", render_markdown(exp, report, failed).encode())
    if plots and results:
        draw_plots(exp, report, results, exp.out / "plots")
    return report


# ----------------------------------------------------------------------------------- command

MARKER = ".splitedge-experiment"  # marks an output directory this command created or took over
# what the command writes at the top of its output directory (and the temporary names of fsutil's atomic writes)
OWN_NAMES = ("runs", "artifacts", "plots", "config.toml", "evals.jsonl", "results.md", "results.json")
_OWN_TMP = re.compile(r"\.(config\.toml|evals\.jsonl|results\.md|results\.json)\.tmp-\d+")


def _is_old_output(out: Path) -> bool:
    """An output directory of this command from before the marker: its own files only, its
    ``config.toml`` and at least one run directory (``runs/<id>/settings.json``, a run's first file)."""
    try:
        names = [p.name for p in out.iterdir()]
        return ((out / "config.toml").is_file() and (out / "runs").is_dir()
                and any((out / "runs").glob("*/settings.json"))
                and all(n in OWN_NAMES or _OWN_TMP.fullmatch(n) for n in names))
    except OSError:
        return False


def check_out_dir(out: Path) -> bool:
    """Refuses (:class:`UserError`) an output directory that is not this command's to write.

    Accepted: a directory that does not exist yet or is empty, one with the :data:`MARKER`,
    and an output of this command written before the marker existed (:func:`_is_old_output`).
    Anything else (say, ``--out`` mistyped as a directory of the user's own with a
    ``results.md`` in it) would have files overwritten. Returns whether the marker is missing.
    """
    if not out.exists():
        return True
    if not out.is_dir():
        raise UserError(f"output directory {out} exists and is not a directory")
    if (out / MARKER).is_file():
        return False
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UserError(f"output directory {out}: cannot read: {e.strerror or e}") from None
    if empty or _is_old_output(out):
        return True
    raise UserError(f"output directory {out} is not empty and was not written by splitedge experiment (it has no "
                    f"{MARKER} file); choose another --out, or, if it is the output of an experiment run before "
                    f"that marker existed, mark it with: touch {out / MARKER}")


def init_out_dir(out: Path, text: str) -> None:
    """Creates (or takes over, see :func:`check_out_dir`) the output directory; writes its
    marker, then ``config.toml``."""
    from ..fsutil import atomic_write_bytes

    unmarked = check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if unmarked:
            (out / MARKER).write_text("written by `splitedge experiment`: its runs, results and plots; a rerun with "
                                      "this output directory resumes and rewrites them\n")
        atomic_write_bytes(out / "config.toml", text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"output directory {out}: cannot write: {e.strerror or e}") from None


def _select(exp: Experiment, patterns: tuple[str, ...]) -> list[tuple[RunConfig, float]]:
    runs = exp.runs()
    if not patterns:
        return runs
    groups_of: dict[str, list[str]] = {}
    for g in exp.groups:
        for r in g.runs:
            groups_of.setdefault(r.run_id, []).append(g.name)
    return [(r, t) for r, t in runs
            if any(fnmatch.fnmatchcase(name, p) for p in patterns for name in [r.run_id, *groups_of[r.run_id]])]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: the config's out, else runs/experiments/<name>]; a non-empty "
                   "directory that this command did not write is refused.")
@click.option("--dry-run", is_flag=True, help="List the runs (done or to do) and exit.")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="Run only runs whose id or group name matches this glob (repeatable); the report covers "
                   "every finished run.")
@click.option("--report-only", is_flag=True, help="Rebuild evals.jsonl, results.md/json and the plots; run nothing.")
@click.option("--progress-every", type=FiniteFloat(min=1), default=30.0, show_default=True,
              help="Seconds between progress lines of a running run.")
def main(config, out, dry_run, only, report_only, progress_every):
    """Run a grid of real split-training runs from a TOML config; write a table and plots.

    \b
    Each run is one cloud-serve and K edge-train processes on this machine, one run
    at a time. A finished run (its result.json) is never redone: rerun the same
    command after an interruption or a failure and only the missing runs execute.
    Exit code 0 when every selected run finished, 1 if some failed, 2 for a bad config
    or an output directory it did not write.

    \b
    Example:
      splitedge experiment experiments/papers.toml --dry-run
      splitedge experiment experiments/papers.toml
      splitedge experiment experiments/papers.toml --only 'sgq4-*' --out /tmp/sgq
    """
    try:
        exp = load_config(config, out, check_data=not report_only)
    except ConfigError as e:
        raise UserError(str(e)) from None
    check_out_dir(exp.out)
    runs = _select(exp, only)
    if only and not runs:
        raise click.BadParameter(f"no run id or group name matches {', '.join(only)}", param_hint="--only")
    echo = lambda s: click.echo(s)  # noqa: E731
    done = {r.run_id for r, _ in runs if load_result(exp.out, r) is not None}
    if dry_run:
        echo(f"{exp.name}: {len(runs)} runs ({len(done)} done) in {exp.out}")
        for g in exp.groups:
            echo(f"  group {g.name}: {len(g.runs)} runs, target {100 * g.target_accuracy:g}%")
        for i, (r, _) in enumerate(runs, 1):
            echo(f"[{i}/{len(runs)}] {'done' if r.run_id in done else 'todo'}  {r.run_id}  "
                 f"({r.codec.label}; {r.describe_setting()}; seed {r.seed})")
        return
    init_out_dir(exp.out, exp.text)
    failed: list[dict[str, Any]] = []
    if not report_only:
        t_grid = time.monotonic()
        artifacts: dict[tuple, Path] = {}
        ran = 0
        for i, (r, timeout_s) in enumerate(runs, 1):
            head = f"[{i}/{len(runs)}] {r.run_id}"
            if r.run_id in done:
                echo(f"{head}: done earlier, skipped")
                continue
            if run_dir(exp.out, r).exists():
                echo(f"{head}: removing an unfinished earlier attempt")
            echo(f"{head}: {r.codec.label}; {r.describe_setting()}; seed {r.seed} "
                 f"(grid time so far {time.monotonic() - t_grid:.0f}s)")
            akey = (r.model, r.cut, r.data, r.optimizer, r.lr)
            try:
                if akey not in artifacts:
                    artifacts[akey] = _artifacts(exp.out, r, echo)
            except Exception as e:  # noqa: BLE001 - export errors are the config's fault
                raise UserError(f"cannot export {r.model} cut {r.cut} for {r.data}: {e}") from None
            try:
                res = execute(exp.out, r, artifacts[akey], timeout_s, echo, progress_every)
            except KeyboardInterrupt:
                echo(f"{head}: interrupted; rerun the same command to resume (finished runs are kept)")
                raise
            except Exception as e:  # noqa: BLE001 - a failed run is reported and the grid goes on
                from . import launch

                msg = str(e) if isinstance(e, launch.RunFailed) else f"{type(e).__name__}: {e}"
                failed.append({"run": r.run_id, "error": msg})
                try:
                    (run_dir(exp.out, r) / "error.txt").write_text(msg + "\n")
                except OSError:
                    pass
                echo(f"{head}: FAILED\n" + "\n".join("      | " + ln for ln in msg.splitlines()))
                continue
            ran += 1
            t = res["traffic"]
            echo(f"      done in {res['wall_s']:.0f}s: final accuracy {100 * res['final_accuracy']:.2f}% (mean of "
                 f"{r.clients}), {fmt_kb(res['payload_bytes_per_step'])} per step, "
                 f"{t['reduction_vs_fp32']:.1f}x less than fp32")
            write_outputs(exp, failed, plots=False)
        echo(f"ran {ran} runs, skipped {len(done)} finished ones, {len(failed)} failed, "
             f"in {time.monotonic() - t_grid:.0f}s")
    report = write_outputs(exp, failed, plots=True)
    missing = sum(len(x["missing"]) for g in report["groups"] for t in g["tables"] for x in t["rows"])
    echo(f"wrote {exp.out / 'results.md'}, results.json, evals.jsonl and plots/"
         + (f" ({missing} grid points not finished)" if missing else ""))
    if failed:
        echo("failed runs (rerun the same command to retry them):")
        for f in failed:
            echo(f"  {f['run']}: {f['error'].splitlines()[0]}")
        sys.exit(1)
