"""`splitedge bench load`: one real cloud-serve holds 32 simulated edge clients without errors,
and the figures it prints are consistent with each other (no timing thresholds: the machine's
load decides the figures, not the code)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import bin_path, run_cli

CLIENTS, STEPS = 32, 5


@pytest.mark.slow
def test_one_cloud_holds_32_clients_without_errors(tmp_path):
    out = tmp_path / "load.json"
    res = subprocess.run([bin_path("splitedge"), "bench", "load", "--clients", str(CLIENTS), "--steps", str(STEPS),
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for words in ("steps/s", "p50", "p99", "errors:"):
        assert words in res.stdout
    r = json.loads(out.read_text())
    assert json.loads(res.stdout.strip().splitlines()[-2]) == r, "the printed JSON is the written one"
    # every client finished, every step was applied once, no error on either side
    assert r["clients"] == CLIENTS and r["clients_finished"] == CLIENTS
    assert r["steps"] == r["cloud_steps"] == CLIENTS * STEPS
    assert r["errors"] == 0 and r["cloud_errors"] == 0 and r["error_kinds"] == {}
    # the figures agree with each other
    lat, srv = r["latency_ms"], r["server_step_ms"]
    assert lat["max"] >= lat["p99"] >= lat["p50"] > 0
    assert srv["p99"] >= srv["p50"] > 0
    assert lat["p50"] >= srv["p50"], "a step's latency includes the server's work on it"
    assert r["wall_s"] > 0 and abs(r["steps_per_s"] - r["steps"] / r["wall_s"]) <= 0.01 * r["steps_per_s"] + 0.01
    assert r["payload_bytes"] > 0 and r["activation_shape"][0] == r["batch_size"]


def test_bench_load_rejects_bad_arguments():
    res = run_cli("splitedge", "bench", "load", "--input-shape", "16x16")
    assert res.returncode == 2 and "must be three positive integers C,H,W" in res.stderr, res.stderr
    res = run_cli("splitedge", "bench", "load", "--cut", "layer9")
    assert res.returncode == 2 and "unknown cut 'layer9'" in res.stderr, res.stderr
    res = run_cli("splitedge", "bench", "load", "--codec", "nosuch")
    assert res.returncode == 2 and "available" in res.stderr
