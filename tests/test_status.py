"""The live status page (cloud-serve --status) and TensorBoard scalars (--tensorboard)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from splitedge.lab import launch
from splitedge.runtime_cloud import status as st

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_DIR = Path(os.environ.get("SPLITEDGE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _step(cid, step, server_step, *, t, loss=1.0, b_in=1000, b_out=800, shape=(8, 64, 4, 4)):
    return {"event": "step", "t": t, "client": cid, "step": step, "server_step": server_step, "loss": loss,
            "bytes_in": b_in, "bytes_out": b_out, "payload_in": b_in - 100, "payload_out": b_out - 100,
            "shape": list(shape), "decode_ms": 1.0, "compute_ms": 10.0, "backward_ms": 2.0, "encode_ms": 3.0,
            "edge_encode_ms": 4.0}


def test_board_follows_the_metrics_events():
    b = st.StatusBoard()
    t = time.time()
    b.observe({"event": "start", "t": t, "model": "resnet18", "cut": 3, "codec": {"name": "uq", "params": {"bits": 4}},
               "grad_codec": {"name": "uq", "params": {"bits": 4}}, "session": "s", "bind": "tcp://x", "server_step": 0})
    for cid in (0, 1):
        b.observe({"event": "client_joined", "t": t, "client": cid, "samples": 100, "last_step": 0, "resume_step": 0,
                   "planned_steps": 5})
    for k in range(1, 4):
        b.observe(_step(0, k, 2 * k - 1, t=t + k, loss=1.0 / k))
        b.observe(_step(1, k, 2 * k, t=t + k + 0.5, loss=2.0 / k))
    # an evaluation in two EVAL batches after step 3, then BYE: its accuracy is 7/10
    b.observe({"event": "eval", "t": t + 4, "client": 0, "step": 3, "n": 6, "correct": 4, "loss_sum": 1.0})
    b.observe({"event": "eval", "t": t + 4, "client": 0, "step": 3, "n": 4, "correct": 3, "loss_sum": 1.0})
    b.observe({"event": "client_done", "t": t + 5, "client": 0, "steps": 3, "applied": 3, "reason": "finished"})
    b.observe({"event": "error", "t": t + 5, "client": 1, "code": "bad_message", "message": "x", "step": None})
    snap = b.snapshot()
    run = snap["run"]
    assert (run["model"], run["cut"], run["server_step"], run["errors"]) == ("resnet18", 3, 6, 1)
    assert run["bytes_in"] == 6000 and run["bytes_out"] == 4800
    fp32 = 6 * 2 * 4 * 8 * 64 * 4 * 4
    assert run["fp32_payload_bytes"] == fp32 and run["compression"] == round(fp32 / (6 * 1600), 2)
    assert run["phases_ms"]["compute"] == 10.0 and run["phases_ms"]["calibration"] == 2.0
    c0, c1 = snap["clients"]
    assert (c0["client_id"], c0["step"], c0["planned_steps"], c0["state"], c0["done"]) == (0, 3, 5, "gone", True)
    assert c0["accuracy"] == pytest.approx(0.7) and c0["eval_samples"] == 10
    assert (c1["client_id"], c1["step"], c1["state"], c1["accuracy"]) == (1, 3, "connected", None)
    assert c1["loss"] == pytest.approx(2.0 / 3) and c1["bytes_in"] == 3000
    assert c1["link_bytes_per_s"] == pytest.approx(2 * 1800 / 2.0)
    assert snap["series"]["server_step"] == [1, 2, 3, 4, 5, 6]
    assert snap["series"]["loss"][-1] == pytest.approx(2.0 / 3)
    json.loads(b.json_bytes())  # serializable, no NaN


def test_board_states_from_the_sessions():
    b = st.StatusBoard(stall_s=5)
    t = time.time()
    for cid in range(4):
        b.observe({"event": "client_joined", "t": t, "client": cid, "samples": 1, "last_step": 0, "resume_step": 0,
                   "planned_steps": 9})
    # (client, seconds silent, active, timed out, waiting)
    b.sync([(0, 1.0, True, False, False), (1, 30.0, True, False, False), (2, 1.0, False, True, True),
            (3, 90.0, False, True, False)])
    states = {c["client_id"]: c["state"] for c in b.snapshot()["clients"]}
    assert states == {0: "connected", 1: "stalled", 2: "waiting", 3: "gone"}


def test_history_is_bounded_and_thinned():
    b = st.StatusBoard(history=50)
    t = time.time()
    for k in range(1, 1001):
        b.observe(_step(0, k, k, t=t + k))
    s = b.snapshot()["series"]["server_step"]
    assert len(s) <= 50 and s[-1] > 900 and s == sorted(s)


@pytest.mark.parametrize("text,expect", [("8080", ("127.0.0.1", 8080)), ("0.0.0.0:81", ("0.0.0.0", 81)),
                                         ("[::1]:0", ("::1", 0)), ("localhost:9", ("localhost", 9))])
def test_parse_address(text, expect):
    assert st.parse_address(text) == expect


@pytest.mark.parametrize("text", ["http", "1:2:x", "70000", "host:-1"])
def test_parse_address_refuses(text):
    with pytest.raises(ValueError):
        st.parse_address(text)


def _get(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def test_server_is_read_only_and_serves_page_and_json():
    b = st.StatusBoard()
    b.observe(_step(3, 1, 1, t=time.time()))
    srv = st.StatusServer(b, "127.0.0.1", 0)
    try:
        code, ctype, body = _get(srv.url)
        assert code == 200 and ctype.startswith("text/html") and b'id="chart-loss"' in body
        code, ctype, body = _get(srv.url + "status.json")
        assert code == 200 and ctype == "application/json"
        data = json.loads(body)
        assert [(c["client_id"], c["step"], c["state"]) for c in data["clients"]] == [(3, 1, "connected")]
        assert _get(srv.url + "nothing")[0] == 404
        for method in ("POST", "PUT", "DELETE"):
            assert _get(srv.url + "status.json", method)[0] == 405
    finally:
        srv.close()


def test_cli_refuses_a_bad_status_address(tmp_path):
    from click.testing import CliRunner

    from splitedge.runtime_cloud.cli import main

    r = CliRunner().invoke(main, ["--artifacts", str(tmp_path), "--status", "nohost:port"])
    assert r.exit_code == 2 and "--status" in r.output and "PORT" in r.output


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path):
    from splitedge.runtime_cloud.tb_scalars import TensorBoardSink

    sink = TensorBoardSink(str(tmp_path / "tb"))
    t = time.time()
    sink.observe(_step(0, 1, 1, t=t, loss=2.5))
    sink.observe(_step(1, 1, 2, t=t + 1, loss=1.5, b_in=2000))
    sink.observe({"event": "eval", "t": t + 2, "client": 1, "n": 8, "correct": 6})
    sink.observe({"event": "fedavg", "t": t + 2, "round": 1, "clients": [0, 1], "samples": 10})
    sink.observe({"event": "client_done", "t": t + 3, "client": 1})
    sink.close()
    sc = _scalars(tmp_path / "tb")
    assert sc["loss/all"] == [(1, 2.5), (2, 1.5)]
    assert sc["loss/client_1"] == [(1, 1.5)]
    assert sc["bytes/step"] == [(1, 1800.0), (2, 2800.0)] and sc["bytes/cumulative"] == [(1, 1800.0), (2, 4600.0)]
    assert sc["accuracy/client_1"] == [(1, 0.75)]
    assert sc["time/calibration_ms"] == [(1, 2.0), (2, 2.0)] and sc["fedavg/clients"] == [(1, 2.0)]


# ------------------------------------------------------------------ a real run, seen in a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium found: install Debian's chromium (scripts/setup --dev does)")


def _browser(url: str, tmp: Path, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot), from headless Chromium."""
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=4000", "--window-size=1400,820"]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    else:
        args.append("--dump-dom")
    r = subprocess.run(args + [url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, artifacts_28):
    """cloud-serve --status --tensorboard --metrics with two real edges; what the page showed while it trained."""
    tmp = tmp_path_factory.mktemp("status")
    port, http_port = launch.free_port(), launch.free_port()
    metrics, tb = tmp / "metrics.jsonl", tmp / "tb"
    cloud = launch.popen_logged(
        launch.script("cloud-serve") + ["--artifacts", str(artifacts_28), "--bind", f"tcp://127.0.0.1:{port}",
                                        "--codec", "uq", "--bits", "4", "--threads", "1", "--log-every", "0",
                                        "--metrics", str(metrics), "--tensorboard", str(tb),
                                        "--status", f"127.0.0.1:{http_port}"],
        tmp / "cloud.log")
    url = f"http://127.0.0.1:{http_port}/"
    edges = []
    seen: list[dict] = []
    out: dict = {"tmp": tmp, "metrics": metrics, "tb": tb, "seen": seen}
    try:
        deadline = time.monotonic() + 120
        while True:  # the page is up once the cloud listens
            try:
                _get(url + "status.json")
                break
            except OSError:
                assert cloud.poll() is None and time.monotonic() < deadline, (tmp / "cloud.log").read_text()
                time.sleep(0.3)
        for cid in (0, 1):
            edges.append(launch.popen_logged(
                launch.script("edge-train") + [
                    "--artifacts", str(artifacts_28), "--connect", f"tcp://127.0.0.1:{port}",
                    "--data", "synthetic:n=640,classes=10,shape=1x28x28,seed=3", "--client-id", str(cid),
                    "--num-clients", "2", "--steps", "40", "--batch-size", "8", "--eval-every", "20",
                    "--eval-samples", "64", "--threads", "1"],
                tmp / f"edge{cid}.log"))
        doms: list[str] = []
        out["doms"] = doms
        while any(e.poll() is None for e in edges):
            seen.append(json.loads(_get(url + "status.json")[2]))
            steps = [c["step"] for c in seen[-1]["clients"]]
            # mid-run: both stepping, charts have points; the page loaded twice, a few steps apart
            if len(steps) == 2 and min(steps) >= 8 and len(doms) < 2 and \
                    (not doms or min(steps) >= out["steps_at_first_dom"] + 4):
                out.setdefault("steps_at_first_dom", min(steps))
                doms.append(_browser(url, tmp))
                if len(doms) == 1:
                    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
                    out["screenshot"] = ARTIFACT_DIR / "status-page.png"
                    _browser(url, tmp, screenshot=out["screenshot"])
            time.sleep(0.5)
        assert [e.returncode for e in edges] == [0, 0], [(tmp / f"edge{c}.log").read_text()[-2000:] for c in (0, 1)]
        time.sleep(1.0)  # the JSON is at most JSON_MAX_AGE_S old
        out["final"] = json.loads(_get(url + "status.json")[2])
    finally:
        for e in edges:
            if e.poll() is None:
                e.kill()
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(timeout=60)
    return out


@pytest.fixture(scope="module")
def artifacts_28(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28))


@pytest.mark.slow
def test_page_in_a_browser_shows_both_clients_and_charts(live_run):
    import re

    doms = live_run["doms"]
    assert len(doms) == 2, "the run ended before the page was loaded twice with both clients stepping"

    def steps_shown(dom: str) -> dict[int, int]:
        return {int(c): int(n) for c, n in re.findall(r'data-client="(\d+)".*?class="step">(\d+)', dom)}

    first, second = steps_shown(doms[0]), steps_shown(doms[1])
    assert sorted(first) == sorted(second) == [0, 1], (first, second)
    assert all(second[c] > first[c] for c in (0, 1)), f"steps shown by the page did not advance: {first} -> {second}"
    dom = doms[1]

    for chart in ("chart-loss", "chart-bytes", "chart-latency"):
        m = re.search(rf'<svg id="{chart}"[^>]*>\s*<polyline[^>]*points="([^"]*)"', dom)
        assert m is not None, chart
        assert len(m.group(1).split()) >= 2, f"{chart} has no line"
    # the pixels: the loss line's blue (#2563eb) is drawn in the screenshot
    from PIL import Image

    img = np.asarray(Image.open(live_run["screenshot"]).convert("RGB")).astype(int)
    blue = (np.abs(img - np.array([0x25, 0x63, 0xEB])).sum(axis=2) < 60).sum()
    assert blue > 100, f"only {blue} pixels of the loss line in {live_run['screenshot']}"


@pytest.mark.slow
def test_json_shows_advancing_steps_and_agrees_with_the_metrics(live_run):
    seen = live_run["seen"]
    for cid in (0, 1):
        steps = [c["step"] for s in seen for c in s["clients"] if c["client_id"] == cid]
        assert len(set(steps)) >= 3 and steps == sorted(steps), steps  # seen advancing while it trained
    events = launch.read_jsonl(live_run["metrics"])
    final = live_run["final"]
    step_ev = [e for e in events if e["event"] == "step"]
    assert final["run"]["server_step"] == max(e["server_step"] for e in step_ev) == 80
    assert final["run"]["bytes_in"] == sum(e["bytes_in"] for e in step_ev)
    assert final["run"]["bytes_out"] == sum(e["bytes_out"] for e in step_ev)
    for c in final["clients"]:
        mine = [e for e in step_ev if e["client"] == c["client_id"]]
        assert c["step"] == mine[-1]["step"] == 40 and c["loss"] == mine[-1]["loss"]
        assert c["bytes_in"] == sum(e["bytes_in"] for e in mine)
        assert c["state"] == "gone" and c["done"] is True and c["planned_steps"] == 40
        evals = [e for e in events if e["event"] == "eval" and e["client"] == c["client_id"] and e["step"] == 40]
        assert c["accuracy"] == pytest.approx(sum(e["correct"] for e in evals) / sum(e["n"] for e in evals))
        assert c["eval_samples"] == 64


@pytest.mark.slow
def test_tensorboard_of_the_run_agrees_with_the_metrics(live_run):
    sc = _scalars(live_run["tb"])
    events = launch.read_jsonl(live_run["metrics"])
    step_ev = [e for e in events if e["event"] == "step"]
    assert [s for s, _ in sc["loss/all"]] == [e["server_step"] for e in step_ev]
    np.testing.assert_allclose([v for _, v in sc["loss/all"]], [e["loss"] for e in step_ev], rtol=1e-6)
    for cid in (0, 1):
        mine = [e for e in step_ev if e["client"] == cid]
        np.testing.assert_allclose([v for _, v in sc[f"loss/client_{cid}"]], [e["loss"] for e in mine], rtol=1e-6)
        acc = dict(sc[f"accuracy/client_{cid}"])
        assert sorted(acc) == [20, 40]
    assert sc["bytes/cumulative"][-1][1] == sum(e["bytes_in"] + e["bytes_out"] for e in step_ev)
    for tag in ("time/decode_ms", "time/compute_ms", "time/calibration_ms", "time/encode_ms", "time/edge_encode_ms"):
        assert len(sc[tag]) == len(step_ev)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
