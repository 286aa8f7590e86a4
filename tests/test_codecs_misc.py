"""Import hygiene of splitedge.codecs, and the `splitedge bench codecs` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from click.testing import CliRunner


def test_import_pulls_in_neither_torch_nor_onnxruntime_nor_scipy():
    code = (
        "import sys, json\n"
        "import splitedge.codecs, splitedge.codecs.bench\n"
        "import splitedge.codecs as c\n"
        "import numpy as np\n"
        "c.decode(c.get('sgq').encode(np.ones((2, 4, 3, 3), np.float32)))\n"
        "heavy = {'torch', 'onnxruntime', 'scipy', 'sklearn', 'onnx'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_codecs_are_never_a_top_level_package():
    out = subprocess.run(
        [sys.executable, "-c", "import codecs, sys; print(codecs.__file__)"], capture_output=True, text=True, check=True
    )
    path = out.stdout.strip()
    assert path.endswith("codecs.py") and "splitedge" not in path  # the standard library's module


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
