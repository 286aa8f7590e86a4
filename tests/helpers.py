"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    """A console script of this install (export-client, cloud-serve, ...)."""
    p = VENV_BIN / name
    return str(p) if p.exists() else name


def edge_run_identity(artifacts, data: str, batch_size: int, **cfg) -> dict:
    """The ``run`` an edge checkpoint of these settings records (``edge_progress.json``), computed with the
    edge's own functions: for tests that write checkpoint directories by hand."""
    from splitedge.export import manifest as mf
    from splitedge.runtime_edge import data as D
    from splitedge.runtime_edge import resume
    from splitedge.runtime_edge.prepare import EdgeConfig

    c = EdgeConfig(artifacts=str(artifacts), data=data, batch_size=batch_size, **cfg)
    labels = D.load(data, split="train").labels
    shards = D.partition_all(labels, c.num_clients, c.partition, c.seed)
    return resume.run_identity(c, mf.load(artifacts), D.partition_fingerprint(labels, shards, c.partition,
                                                                              c.seed)["plan"])


# The console scripts, as pyproject.toml's [project.scripts] names them.
SCRIPT_COMMANDS = {
    "splitedge": "splitedge.cli:main",
    "export-client": "splitedge.export.cli:main",
    "cloud-serve": "splitedge.runtime_cloud.cli:main",
    "edge-train": "splitedge.runtime_edge.cli:main",
    "flash-board": "splitedge.profiles.flash_cli:main",
}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(name: str, *args: str) -> CliResult:
    """Runs console script ``name`` with ``args`` in this process, through click's CliRunner: for
    --help and argument errors, which end before any work (no import cost per call, unlike a
    subprocess). An exception that escapes the command (a traceback a user would see) is raised."""
    import importlib

    from click.testing import CliRunner

    module, attr = SCRIPT_COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module), attr)
    res = CliRunner().invoke(command, list(args), prog_name=name)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return CliResult(res.exit_code, res.stdout, res.stderr)
