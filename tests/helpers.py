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
