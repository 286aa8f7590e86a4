"""Import hygiene and packaging of splitedge.codecs, and the `splitedge bench codecs` command."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

from click.testing import CliRunner
from packaging.requirements import Requirement


def test_import_pulls_in_neither_torch_nor_onnxruntime_nor_scipy():
    code = (
        "import sys, json\n"
        "import splitedge.codecs\n"
        "import splitedge.codecs as c\n"
        "import numpy as np\n"
        "c.decode(c.get('sgq').encode(np.ones((2, 4, 3, 3), np.float32)))\n"
        "heavy = {'torch', 'onnxruntime', 'scipy', 'sklearn', 'onnx'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level import names a distribution provides.

    Its top_level.txt, the first component of every file it installed beside its .dist-info, and
    for an editable install the names its setuptools finder maps (``MAPPING``/``NAMESPACES``) or
    the packages in the folders its .pth file adds to sys.path.
    """
    names = set((dist.read_text("top_level.txt") or "").split())
    for f in dist.files or []:
        first = f.parts[0]
        if first == ".." or first == "__pycache__" or first.endswith((".dist-info", ".egg-info")):
            continue
        if f.suffix == ".pth":
            for line in f.read_text().splitlines():
                entry = line.strip()
                if entry and not entry.startswith(("#", "import ", "import\t")) and Path(entry).is_dir():
                    names |= {p.name.split(".")[0] for p in Path(entry).iterdir()
                              if (p / "__init__.py").is_file() or p.suffix == ".py"}
        elif first.startswith("__editable__") and f.suffix == ".py":  # setuptools' editable finder
            spec = importlib.util.spec_from_file_location("_splitedge_finder_probe", f.locate())
            finder = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(finder)
            names |= {k.split(".")[0] for k in [*finder.MAPPING, *finder.NAMESPACES]}
        else:
            names.add(first.split(".")[0])
    return names


def test_codecs_are_never_a_top_level_package():
    """The installed distribution provides `splitedge` alone: no top-level `codecs` (or `export`, ...)."""
    names = top_level_names(importlib.metadata.distribution("splitedge"))
    assert names == {"splitedge"}, names


def test_the_top_level_check_sees_a_top_level_codecs(tmp_path):
    """The check above can fail: a distribution that installs codecs/ itself, or maps it in an editable
    finder, is seen to provide `codecs`."""
    # prepare: a wheel-style install and an editable one, each with a top-level codecs
    site = tmp_path / "site"
    info = site / "bad-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad\nVersion: 0.1\n")
    (info / "RECORD").write_text("codecs/__init__.py,,\nbad/__init__.py,,\nbad-0.1.dist-info/RECORD,,\n")
    edit = tmp_path / "edit"
    einfo = edit / "worse-0.1.dist-info"
    einfo.mkdir(parents=True)
    (einfo / "METADATA").write_text("Metadata-Version: 2.1\nName: worse\nVersion: 0.1\n")
    (edit / "__editable___worse_0_1_finder.py").write_text(
        "MAPPING = {'worse': '/src/worse', 'codecs': '/src/codecs'}\nNAMESPACES = {}\n")
    (einfo / "RECORD").write_text("__editable___worse_0_1_finder.py,,\nworse-0.1.dist-info/RECORD,,\n")
    # execute
    wheel_names = top_level_names(importlib.metadata.PathDistribution(info))
    editable_names = top_level_names(importlib.metadata.PathDistribution(einfo))
    # assert
    assert wheel_names == {"codecs", "bad"}
    assert editable_names == {"codecs", "worse"}


def test_build_requires_a_setuptools_that_reads_the_spdx_license_string():
    """`license = "Apache-2.0"` (a PEP 639 SPDX expression) needs setuptools >= 77 to build."""
    doc = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert isinstance(doc["project"]["license"], str)
    reqs = [Requirement(r) for r in doc["build-system"]["requires"]]
    (setuptools,) = [r for r in reqs if r.name == "setuptools"]
    assert "77" in setuptools.specifier and "76.99" not in setuptools.specifier, setuptools


def test_bench_codecs_writes_json(tmp_path):
    from splitedge.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "codecs", "--repeat", "1", "--codecs", "uq,fp16", "--shapes", "2x4x4x4,3x5x2", "--json", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "enc/copy" in res.output and "uq" in res.output
    doc = json.loads(out.read_text())
    assert doc["bits"] == 4 and doc["repeat"] == 1 and doc["edge_step_ms"] is None
    rows = doc["results"]
    assert [(r["codec"], r["shape"]) for r in rows] == [
        ("uq", [2, 4, 4, 4]),
        ("fp16", [2, 4, 4, 4]),
        ("uq", [3, 5, 2]),
        ("fp16", [3, 5, 2]),
    ]
    fields = {"params", "bytes_in", "bytes_out", "compression_ratio", "copy_ms", "encode_ms", "decode_ms"}
    fields |= {"encode_vs_copy", "decode_vs_copy", "rel_mse", "max_abs_err"}
    for r in rows:
        assert fields <= set(r)
        assert r["encode_ms"] > 0 and r["decode_ms"] > 0 and r["copy_ms"] > 0
        assert abs(r["encode_vs_copy"] - r["copy_ms"] / r["encode_ms"]) < 1e-9
        assert r["bytes_in"] == 4 * math.prod(r["shape"])
        assert r["compression_ratio"] == r["bytes_in"] / r["bytes_out"]
    assert rows[0]["params"] == {"bits": 4, "grid": "zero"}


def test_bench_codecs_rejects_bad_options():
    from splitedge.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["bench", "codecs", "--codecs", "nope"])
    assert res.exit_code == 2 and "available" in res.output
    res = runner.invoke(main, ["bench", "codecs", "--shapes", "3x"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["bench", "codecs", "--bits", "9"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["bench", "codecs", "--help"])
    assert res.exit_code == 0 and "--edge-step" in res.output and "--json" in res.output


def test_fp16_cast_benchmark_runs_and_finds_numpys_cast_bit_identical():
    """`splitedge bench fp16-cast` backs docs/codecs.md's fp16 figures; it asserts the codec's conversion and
    numpy's cast bit-identical (every finite half code; three value ranges) and exits non-zero otherwise."""
    res = subprocess.run([sys.executable, "-m", "splitedge.cli", "bench", "fp16-cast", "--repeat", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "decode: bit-identical on every finite half code (63488)" in res.stdout
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.split()[-6:-5] in (["encode"], ["decode"])]
    assert len(rows) == 6 and all(float(r[-1]) > 0 for r in rows), res.stdout
