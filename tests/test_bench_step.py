"""`splitedge bench step` runs on a fresh install and reports consistent figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from helpers import bin_path, run_cli


@pytest.mark.slow
def test_bench_step_prints_and_writes_json(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run(
        [bin_path("splitedge"), "bench", "step", "--repeat", "2", "--codecs", "uq,sgq", "--shapes", "1x28x28", "--cut", "3", "--batch-size", "32",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "edge step on ORT" in res.stdout and "ORT / torch" in res.stdout
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["input_shape"] == [1, 28, 28] and r["activation_shape"] == [32, 64, 14, 14]
    assert r["ort_step_ms"] > 0 and r["torch_step_ms"] > 0
    assert abs(r["ort_over_torch"] - r["ort_step_ms"] / r["torch_step_ms"]) < 0.01
    # the portable backend side by side with ORT training and torch eager, same run
    assert r["portable_ms"] > 0 and r["ort_training_ms"] == r["ort_step_ms"] and r["torch_ms"] == r["torch_step_ms"]
    assert abs(r["portable_over_torch"] - r["portable_ms"] / r["torch_ms"]) < 0.01
    assert abs(r["ort_training_over_portable"] - r["ort_training_ms"] / r["portable_ms"]) < 0.01
    assert set(r["peak_rss_mib"]) == {"portable", "ort_training", "torch"}
    assert "edge step on the portable backend" in res.stdout and "portable targets over 1 rows" in res.stdout
    assert [c["codec"] for c in r["codecs"]] == ["uq", "sgq"]
    for c in r["codecs"]:
        assert abs(c["encode_share"] - c["encode_ms"] / r["ort_step_ms"]) < 1e-3
        assert c["compression_vs_fp32"] > 5
    sgq = r["codecs"][1]
    verdict = "met" if sgq["encode_share"] < 0.1 else "not met"
    assert f"sgq {100 * sgq['encode_share']:.1f}% ({verdict})" in res.stdout, "the target line reads this run's figure"


def test_bench_step_rejects_bad_shapes():
    res = run_cli("splitedge", "bench", "step", "--shapes", "28x28")
    assert res.returncode == 2 and "CxHxW" in res.stderr


@pytest.mark.slow
def test_sgq_floor_script_runs_and_onnxruntime_assigns_like_numpy():
    """`splitedge bench sgq-floor` backs docs/codecs.md's account of SGQ's encode time; it exits
    non-zero if ONNX Runtime's assignment disagrees with kmeans.nearest's labels."""
    res = subprocess.run([sys.executable, "-m", "splitedge.cli", "bench", "sgq-floor", "--repeat", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rate = re.search(r"23\.6 MFLOP at ([0-9.]+) GFLOP/s", res.stdout)
    assert rate and float(rate.group(1)) > 0, res.stdout
    assert res.stdout.count("labels agree on") == 2 and "sgq encode, whole" in res.stdout
