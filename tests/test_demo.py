"""`splitedge demo`, the README's main job, in a short configuration (the full one is one epoch)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import bin_path, run_cli


@pytest.mark.slow
def test_demo_runs_the_whole_system_and_reports_accuracy_and_traffic(tmp_path):
    wd = tmp_path / "demo"
    wd.mkdir()
    (wd / ".splitedge-demo").write_text("an earlier demo\n")
    (wd / "stale.txt").write_text("from the earlier demo\n")
    res = subprocess.run(
        [bin_path("splitedge"), "demo", "--workdir", str(wd), "--data", "synthetic:n=1024,classes=10,shape=1x28x28",
         "--steps", "8", "--batch-size", "16", "--eval-samples", "64"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "[4/4] done" in out and "less traffic than fp32" in out
    import re

    live = re.search(r"watch it live at (http://127\.0\.0\.1:\d+/)", out)
    assert live, "the demo prints its status page's address while it trains"
    cloud_cmd = (wd / "run" / "cloud.cmd").read_text()
    assert "--status 127.0.0.1:" + live.group(1).rsplit(":", 1)[1].rstrip("/") in cloud_cmd
    summary = json.loads((wd / "demo-summary.json").read_text())
    assert summary["codec"] == "sgq" and summary["clients"] == 2 and len(summary["accuracy_per_client"]) == 2
    t = summary["traffic"]
    assert t["steps"] == 16 and t["payload_bytes"] == t["activation_bytes"] + t["gradient_bytes"]
    assert t["reduction_vs_fp32"] > 20
    tally = [line for line in out.splitlines() if "server steps" in line]
    assert tally and tally[-1].strip().startswith("16 server steps"), "the last progress line is the final tally"
    assert not (wd / "stale.txt").exists(), "an earlier demo's workdir is replaced"
    for c in range(2):
        s = json.loads((wd / "run" / f"edge-{c}.json").read_text())
        assert s["steps"] == 8 and f"test accuracy {100 * s['final_accuracy']:.2f}%" in out


def test_demo_reports_a_missing_dataset_clearly(tmp_path):
    res = run_cli("splitedge", "demo", "--workdir", str(tmp_path / "d"), "--data", f"idx:{tmp_path / 'nothing'}")
    assert res.returncode == 2
    assert "nothing" in res.stderr and "Error" in res.stderr
    assert not (tmp_path / "d").exists()


def test_demo_never_replaces_a_directory_it_did_not_write(tmp_path):
    wd = tmp_path / "precious"
    wd.mkdir()
    (wd / "thesis.tex").write_text("years of work\n")
    res = run_cli("splitedge", "demo", "--workdir", str(wd), "--data", "synthetic:n=256,classes=10,shape=1x28x28",
                  "--steps", "1")
    assert res.returncode == 2 and "was not written by splitedge demo" in res.stderr
    assert (wd / "thesis.tex").read_text() == "years of work\n" and sorted(p.name for p in wd.iterdir()) == ["thesis.tex"]


def test_a_bad_cut_leaves_the_last_demo_in_place(tmp_path):
    """--cut is checked (without torch) before the workdir is replaced: a typo must not cost the
    previous demo's results."""
    wd = tmp_path / "demo"
    wd.mkdir()
    (wd / ".splitedge-demo").write_text("an earlier demo\n")
    (wd / "demo-summary.json").write_text("{}\n")
    res = run_cli("splitedge", "demo", "--workdir", str(wd), "--cut", "layer9")
    assert res.returncode == 2 and "unknown cut 'layer9'" in res.stderr, res.stderr
    assert (wd / "demo-summary.json").read_text() == "{}\n"
