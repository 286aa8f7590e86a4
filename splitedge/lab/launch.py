"""Running a cloud and its edge clients as real processes on this machine.

Used by ``splitedge demo``, ``splitedge experiment`` and the end-to-end tests: each
run is one ``cloud-serve`` process and K ``edge-train`` processes talking ZeroMQ
over TCP loopback, with their logs, metrics and summaries in one directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any


def popen_logged(cmd: list[str], log: str | os.PathLike[str], *, mode: str = "w", **kw: Any) -> subprocess.Popen:
    """Starts ``cmd`` with its stdout and stderr going to the file ``log``; the parent's handle on the
    file is closed once the child has it."""
    with open(log, mode) as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name: str) -> list[str]:
    """The command for a console script of this install (works from a venv without activating it)."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found:
        return [found]
    modules = {
        "cloud-serve": "splitedge.runtime_cloud.cli",
        "edge-train": "splitedge.runtime_edge.cli",
        "export-client": "splitedge.export.cli",
    }
    return [sys.executable, "-m", modules[name]]


class RunFailed(RuntimeError):
    pass


@dataclass
class RunSpec:
    workdir: Path
    artifacts: Path
    num_clients: int
    cloud_args: list[str] = field(default_factory=list)
    edge_args: list[str] = field(default_factory=list)  # for every client
    per_client_args: dict[int, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 3600.0
    port: int | None = None
    edge_command: list[str] | None = None  # how to start an edge; default: this install's edge-train


@dataclass
class RunResult:
    summaries: list[dict[str, Any]]
    metrics_path: Path
    wall_s: float
    endpoint: str

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    out.append(json.loads(line))
    return out


class _JsonlTail:
    """Reads the complete lines appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written stays for the next call
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run(spec: RunSpec, on_tick: Callable[[list[dict[str, Any]]], None] | None = None) -> RunResult:
    """Starts the cloud and the clients, waits for all of them, returns the clients' summaries.

    Raises :class:`RunFailed` with the tail of the failing process's log.
    """
    wd = spec.workdir
    wd.mkdir(parents=True, exist_ok=True)
    port = spec.port or free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    metrics = wd / "cloud-metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    t0 = time.monotonic()
    try:
        cloud_log = wd / "cloud.log"
        cloud_cmd = script("cloud-serve") + [
            "--artifacts", str(spec.artifacts), "--bind", endpoint, "--metrics", str(metrics),
            "--expect-clients", str(spec.num_clients), "--exit-when-done", *spec.cloud_args,
        ]
        (wd / "cloud.cmd").write_text(" ".join(cloud_cmd) + "\n")
        procs.append(("cloud-serve", popen_logged(cloud_cmd, cloud_log, env=env), cloud_log))
        for cid in range(spec.num_clients):
            log = wd / f"edge-{cid}.log"
            cmd = (spec.edge_command or script("edge-train")) + [
                "--artifacts", str(spec.artifacts), "--connect", endpoint, "--client-id", str(cid),
                "--num-clients", str(spec.num_clients), "--summary", str(wd / f"edge-{cid}.json"), "--no-progress",
                *spec.edge_args, *spec.per_client_args.get(cid, []),
            ]
            (wd / f"edge-{cid}.cmd").write_text(" ".join(cmd) + "\n")
            procs.append((f"edge-train {cid}", popen_logged(cmd, log, env=env), log))
        tail = _JsonlTail(metrics)
        events: list[dict[str, Any]] = []
        while True:
            if time.monotonic() - t0 > spec.timeout_s:
                raise RunFailed(f"run in {wd} exceeded {spec.timeout_s:.0f}s")
            for name, p, log in procs:
                rc = p.poll()
                if rc not in (None, 0):
                    raise RunFailed(f"{name} exited with code {rc}; last lines of {log}:\n{_tail(log)}")
            if all(p.poll() == 0 for _, p, _ in procs):
                break
            if on_tick is not None:
                new = tail.read()
                if new:
                    events.extend(new)
                    on_tick(events)
            time.sleep(0.2)
    finally:
        for _, p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p, _ in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    summaries = [json.loads((wd / f"edge-{cid}.json").read_text()) for cid in range(spec.num_clients)]
    return RunResult(summaries, metrics, time.monotonic() - t0, endpoint)


def traffic(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes of the TRAIN/GRAD messages of a run, from the cloud's step metrics, and what fp32
    payloads of the same shapes would have been (the fp32 codec's exact payload size)."""
    from ..codecs import get

    fp32 = get("fp32")
    steps = [e for e in events if e.get("event") == "step"]
    act = grad = frames_in = frames_out = fp32_payloads = 0
    sizes: dict[tuple, int] = {}
    for e in steps:
        act += e["payload_in"]
        grad += e["payload_out"]
        frames_in += e["bytes_in"]
        frames_out += e["bytes_out"]
        shape = tuple(e["shape"])
        if shape not in sizes:
            import numpy as np

            sizes[shape] = len(fp32.encode(np.zeros(shape, dtype=np.float32)))
        fp32_payloads += 2 * sizes[shape]
    payloads = act + grad
    return {
        "steps": len(steps), "activation_bytes": act, "gradient_bytes": grad, "payload_bytes": payloads,
        "frame_bytes": frames_in + frames_out, "fp32_payload_bytes": fp32_payloads,
        "reduction_vs_fp32": fp32_payloads / payloads if payloads else None,
    }
