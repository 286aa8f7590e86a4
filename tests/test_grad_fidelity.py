"""scripts/grad_fidelity.py (issue 14's real-gradient table) on a few synthetic steps, so it cannot rot.

The real run (Fashion-MNIST, 150 steps) and its table are in docs/codecs.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import splitedge.codecs as codecs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "grad_fidelity.py"
DATA = "synthetic:n=64,test=16,classes=10,shape=1x28x28,seed=1"


@pytest.mark.slow
def test_grad_fidelity_prints_a_row_for_every_codec(tmp_path):
    out = tmp_path / "gf.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "3", "--batch-size", "8", "--data", DATA, "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {row["codec"] for row in rows if not row["ablation"]} == set(codecs.available())
    by = {row["label"]: row for row in rows}
    for row in rows:
        assert row["label"].split(" ")[0] in r.stdout
        assert row["rel_err"] >= 0 and -1 - 1e-9 <= row["cosine"] <= 1 + 1e-9 and row["bits_per_value"] > 0
    assert by["fp32"]["rel_err"] == 0 and by["fp32"]["cosine"] > 0.999999 and by["fp32"]["bits_per_value"] > 32
    # the zero-preserving grids keep the gradient's exact zeros; the min-max ablation rows do not
    for label in ("uq:4", "slacc", "powerquant:4", "easyquant:4"):
        assert by[label]["zeros_exact"] == 1.0
    assert by["uq:4 grid=minmax"]["zeros_exact"] < 0.5 and by["slacc grid=minmax"]["zeros_exact"] < 0.5
    assert "cos@3" in r.stdout and "bias" in r.stdout and "SL-ACC setting" in r.stdout
    # item 2's measures, for every SL-ACC row: the gradient ranking's stability, the activation side
    for row in rows:
        if row["codec"] == "slacc":
            assert -1 <= row["grad_rank_corr"] <= 1 and 0 <= row["grad_bits_changed"] <= 1
            assert row["act_bits_per_value"] > 0 and row["act_rel_err"] >= 0
    assert by["slacc ranking=none"]["grad_bits_changed"] == 0  # one group: no channel changes width


def test_grad_fidelity_refuses_bad_arguments():
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", "nosuch:x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--data" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--steps" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--only", "zstd", "--data", DATA], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "--only" in r.stderr
