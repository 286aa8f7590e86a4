"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

from __future__ import annotations

import sys
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
