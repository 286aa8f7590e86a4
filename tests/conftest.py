"""Shared fixtures. Exports are cached per session: each takes about a second."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """``exported(model, cut, input_shape=(3, 32, 32), **kw) -> Path``, cached for the session."""
    cache: dict[tuple, Path] = {}

    def make(model: str, cut, input_shape=(3, 32, 32), **kw) -> Path:
        key = (model, str(cut), tuple(input_shape), tuple(sorted(kw.items())))
        if key not in cache:
            from splitedge.export import onnx_export as oe

            out = tmp_path_factory.mktemp(f"{model}-cut{cut}") / "artifacts"
            oe.export(oe.ExportRequest(model, cut, input_shape=tuple(input_shape), out=str(out), **kw))
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture
def ort_threads(monkeypatch):
    """Pins ORT to one thread where a test compares numbers across runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return 1


def pytest_report_header(config):
    return [f"splitedge tests: python {sys.executable}, cpus {os.cpu_count()}"]
