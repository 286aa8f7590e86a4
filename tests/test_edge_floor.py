"""The edge's Python floor: every module the board receives runs on CPython 3.8.

``vermin`` reads each file of the edge bundle (the same module list ``flash-board`` packs,
``profiles.bundle.edge_sources``) and reports the oldest Python each construct needs: syntax,
standard-library modules and members. A 3.9+ construct fails this test before it reaches a
board. What vermin cannot see (numpy 2-only calls, a generic alias evaluated at run time) is
covered by tests/test_edge_pythons.py, which trains on CPython 3.8 with numpy 1.24 and
onnxruntime 1.11.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitedge.profiles import bundle

FLOOR = "3.8"


def vermin(*paths: str) -> subprocess.CompletedProcess:
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if exe is None:
        pytest.fail("vermin is not installed: it is a dev requirement (scripts/setup --dev)")
    return subprocess.run([exe, f"-t={FLOOR}-", "--violations", "--no-tips", "--no-parse-comments", *paths],
                          capture_output=True, text=True, timeout=300)


def test_every_edge_module_runs_on_the_floor_python():
    files = sorted(str(p) for p in bundle.edge_sources().values())
    # the list is the edge, not a stub: the client, both backends, the wire layer and every codec
    names = set(bundle.edge_module_names())
    assert {"splitedge.runtime_edge.client", "splitedge.runtime_edge.portable_backend", "splitedge.wire.protocol",
            "splitedge.codecs.sgq", "splitedge.profiles.schema"} <= names, names
    res = vermin(*files)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_floor_check_catches_newer_constructs(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import tomllib\n\nname = "x-y".removeprefix("x")\n')
    res = vermin(str(bad))
    assert res.returncode != 0 and "removeprefix" in res.stdout and "tomllib" in res.stdout, res.stdout
