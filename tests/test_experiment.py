"""``splitedge experiment``: a small grid end to end, its outputs checked against the raw run files.

The grid: fp32 and SGQ 4-bit, 1 seed, 2 clients x 50 steps of batch 16 on synthetic 1x28x28 data,
every client on an emulated 50 Mbit/s + 5 ms link: 200 training steps of real ``cloud-serve`` and
``edge-train`` processes (about a minute on the 2-core CI machine). Every figure of results.json
and results.md is recomputed here from the run directories (``edge-<i>.json``,
``cloud-metrics.jsonl``) and ``evals.jsonl``, with the formulas of docs/experiments.md.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitedge.lab import experiment as X
from splitedge.lab.experiment.config import _slug
from splitedge.lab.launch import script

SYNTH = "synthetic:n=2048,classes=10,shape=1x28x28,seed=0"
STEPS, EVERY, CLIENTS, TARGET = 50, 25, 2, 0.9
CONFIG = f"""
[experiment]
name = "tiny"
title = "Tiny grid"
data = "{SYNTH}"
batch_size = 16
lr = 0.02
eval_every = {EVERY}
eval_samples = 256
latency = "5ms"
target_accuracy = {TARGET}
timeout_s = 300

[grid]
codecs = ["fp32", "sgq:4"]
clients = [{CLIENTS}]
bandwidth = ["50mbit"]
steps = [{STEPS}]
seeds = [0]
"""


def _cli(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    p = subprocess.run(script("splitedge") + ["experiment", *args], capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Runs the grid once (real processes); returns (config path, output dir, first run's stdout)."""
    d = tmp_path_factory.mktemp("experiment")
    cfg = d / "tiny.toml"
    cfg.write_text(CONFIG)
    out = d / "out"
    p, _ = _cli(str(cfg), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    return cfg, out, p.stdout


def _runs(out: Path) -> dict[str, Path]:
    """codec label -> run directory, from the run directories' settings."""
    found = {}
    for d in sorted((out / "runs").iterdir()):
        s = json.loads((d / "settings.json").read_text())["settings"]
        label = s["codec"]["name"] + (f":{s['codec']['params']['bits']}" if "bits" in s["codec"]["params"] else "")
        found[label] = d
    return found


def _recompute(run: Path) -> dict:
    """A run's figures from its raw files, independently of splitedge.lab.experiment."""
    edges = [json.loads((run / f"edge-{c}.json").read_text()) for c in range(CLIENTS)]
    steps = [e for e in _jsonl(run / "cloud-metrics.jsonl") if e["event"] == "step"]
    payload = sum(e["payload_in"] + e["payload_out"] for e in steps)
    elements = [math.prod(e["shape"]) for e in steps]
    fp32 = sum(2 * (40 + 4 * m) for m in elements)  # docs/codecs.md: fp32 = 40 + 4M bytes
    uq4 = sum(2 * (46 + 4 + math.ceil(4 * m / 8)) for m in elements)  # uq v2: 46 + 4 + ceil(nM/8)
    points = {}
    for c, s in enumerate(edges):
        spent = 0.0
        for ev in s["evals"]:
            spent += ev["eval_s"]
            p = points.setdefault(ev["step"], {"acc": {}, "train_time": {}, "time": {}})
            p["acc"][c] = ev["accuracy"]
            p["train_time"][c] = ev["time_s"] - spent
            p["time"][c] = ev["time_s"]
    for step, p in points.items():
        p["payload"] = sum(e["payload_in"] + e["payload_out"] for e in steps if e["step"] <= step)
    return {"edges": edges, "steps": steps, "payload": payload, "fp32": fp32, "uq4": uq4,
            "final": sum(s["final_accuracy"] for s in edges) / CLIENTS, "points": points}


@pytest.mark.slow
def test_grid_writes_every_output(grid):
    _, out, stdout = grid
    for name in ("evals.jsonl", "results.md", "results.json", "config.toml"):
        assert (out / name).is_file(), name
    for kind in ("accuracy-time", "accuracy-traffic", "bytes-per-step"):
        assert (out / "plots" / f"tiny-{kind}.png").is_file(), kind
    runs = _runs(out)
    assert set(runs) == {"fp32", "sgq:4"}
    for d in runs.values():
        assert (d / "result.json").is_file() and (d / "cloud-metrics.jsonl").is_file()
        assert all((d / f"edge-{c}.json").is_file() for c in range(CLIENTS))
    assert "[1/2]" in stdout and "[2/2]" in stdout and "ran 2 runs" in stdout


@pytest.mark.slow
def test_every_run_trained_the_planned_steps(grid):
    _, out, _ = grid
    for label, d in _runs(out).items():
        r = _recompute(d)
        assert sorted((e["client"], e["step"]) for e in r["steps"]) == sorted(
            (c, s) for c in range(CLIENTS) for s in range(1, STEPS + 1)), label
        assert [s["steps"] for s in r["edges"]] == [STEPS] * CLIENTS
        assert all(s["link"] and "50mbit" in s["link"] for s in r["edges"]), "the emulated link was not used"
        assert r["edges"][0]["codec"]["name"] == label.split(":")[0]



@pytest.mark.slow
def test_every_run_wrote_tensorboard_scalars_of_its_steps(grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = grid
    for label, d in _runs(out).items():
        ea = EventAccumulator(str(d / "tensorboard"), size_guidance={"scalars": 0})
        ea.Reload()
        losses = [e.value for e in ea.Scalars("loss/all")]
        steps = [e for e in _jsonl(d / "cloud-metrics.jsonl") if e["event"] == "step"]
        assert len(losses) == len(steps) == CLIENTS * STEPS, label
        assert losses == pytest.approx([e["loss"] for e in steps], rel=1e-6), label


@pytest.mark.slow
def test_evals_jsonl_matches_the_clients_and_the_cloud(grid):
    _, out, _ = grid
    lines = _jsonl(out / "evals.jsonl")
    for label, d in _runs(out).items():
        r = _recompute(d)
        mine = sorted((x for x in lines if x["run"] == d.name), key=lambda x: x["step"])
        assert [x["step"] for x in mine] == sorted(r["points"]) == [EVERY, 2 * EVERY], label
        for x in mine:
            p = r["points"][x["step"]]
            assert x["codec"] == label and x["clients"] == CLIENTS and x["clients_reporting"] == CLIENTS
            assert x["accuracy_per_client"] == [p["acc"][c] for c in range(CLIENTS)]
            assert x["accuracy"] == pytest.approx(sum(p["acc"].values()) / CLIENTS, abs=1e-12)
            assert x["train_time_s"] == pytest.approx(sum(p["train_time"].values()) / CLIENTS, abs=2e-3)
            assert x["time_s"] == pytest.approx(sum(p["time"].values()) / CLIENTS, abs=2e-3)
            assert x["payload_bytes"] == p["payload"]
        assert mine[-1]["payload_bytes"] == r["payload"]
        assert mine[-1]["accuracy"] == pytest.approx(r["final"], abs=1e-12)
        # the run directory's own evals.jsonl holds the same lines
        assert _jsonl(d / "evals.jsonl") == [x for x in lines if x["run"] == d.name]


def _expected_rows(out: Path) -> dict[str, dict]:
    runs = {label: _recompute(d) for label, d in _runs(out).items()}
    lines = _jsonl(out / "evals.jsonl")
    rows = {}
    for label, r in runs.items():
        run_id = _runs(out)[label].name
        pts = sorted((x for x in lines if x["run"] == run_id), key=lambda x: x["step"])
        hit = next((x for x in pts if x["clients_reporting"] == CLIENTS and x["accuracy"] >= TARGET), None)
        rows[label] = {
            "final": r["final"], "per_step": r["payload"] / len(r["steps"]),
            "vs_fp32": r["fp32"] / r["payload"], "vs_uq": r["uq4"] / r["payload"],
            "gap": 100 * (r["final"] - runs["fp32"]["final"]),
            "time": hit["train_time_s"] if hit else None, "step": hit["step"] if hit else None,
            "to_target": hit["payload_bytes"] if hit else None,
        }
    # the fp32 reference computed from the formula is what the fp32 run really sent
    assert runs["fp32"]["payload"] == runs["fp32"]["fp32"]
    assert rows["fp32"]["vs_fp32"] == 1.0
    return rows


@pytest.mark.slow
def test_results_json_agrees_with_the_runs(grid):
    _, out, _ = grid
    expected = _expected_rows(out)
    report = json.loads((out / "results.json").read_text())
    (group,) = report["groups"]
    assert group["name"] == "tiny" and group["target_accuracy"] == TARGET
    (table,) = group["tables"]
    got = {x["codec"]: x for x in table["rows"]}
    assert set(got) == set(expected)
    for label, e in expected.items():
        x = got[label]
        assert x["final_accuracy"] == pytest.approx(e["final"], abs=1e-12), label
        assert x["gap_to_fp32"] == pytest.approx(e["gap"], abs=1e-9), label
        assert x["payload_bytes_per_step"] == pytest.approx(e["per_step"], rel=1e-12), label
        assert x["reduction_vs_fp32"] == pytest.approx(e["vs_fp32"], rel=1e-12), label
        assert x["uq_bits_used"] == 4 and x["reduction_vs_uq"] == pytest.approx(e["vs_uq"], rel=1e-12), label
        if e["time"] is None:
            assert x["time_to_target_s"] is None and x["target_reached"] == 0
        else:
            assert x["time_to_target_s"] == pytest.approx(e["time"], abs=1e-9), label
            assert x["steps_to_target"] == e["step"] and x["payload_bytes_to_target"] == e["to_target"]
    # SGQ 4-bit sends far less than fp32 (Eq. 8: ~40x for 16x64x14x14) and less than uq 4-bit
    assert got["sgq:4"]["reduction_vs_fp32"] > 20 and got["sgq:4"]["reduction_vs_uq"] > 2
    assert report["failed"] == []


def _md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("codec",) and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_results_md_agrees_with_the_runs(grid):
    _, out, _ = grid
    expected = _expected_rows(out)
    text = (out / "results.md").read_text()
    assert "# Tiny grid" in text and f"time to {100 * TARGET:g}%" in text
    rows = _md_rows(text)
    assert set(rows) == set(expected)
    for label, e in expected.items():
        c = rows[label]
        assert c[1] == f"{100 * e['final']:.2f}%"
        assert c[2] == f"{e['gap']:+.2f}"
        assert c[3] == f"{e['per_step'] / 1000:,.1f} kB"
        assert c[4] == f"{e['vs_fp32']:.1f}×"
        assert c[5] == f"{e['vs_uq']:.2f}× (uq4)"
        if e["time"] is None:
            assert c[6].startswith("not reached")
        else:
            assert (c[6], c[7], c[8]) == (f"{e['time']:.0f} s", f"{e['step']}", f"{e['to_target'] / 1e6:,.1f} MB")
    for kind in ("accuracy-time", "accuracy-traffic", "bytes-per-step"):
        assert f"(plots/tiny-{kind}.png)" in text


@pytest.mark.slow
def test_plots_are_valid_pngs(grid):
    _, out, _ = grid
    import matplotlib.image as mpimg

    for kind in ("accuracy-time", "accuracy-traffic", "bytes-per-step"):
        data = (out / "plots" / f"tiny-{kind}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", kind
        length, tag = struct.unpack(">I4s", data[8:16])
        assert tag == b"IHDR" and length == 13
        width, height = struct.unpack(">II", data[16:24])
        assert width > 100 and height > 100
        assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0], "IHDR CRC"
        img = mpimg.imread(out / "plots" / f"tiny-{kind}.png")
        assert img.shape[:2] == (height, width) and img.std() > 0, "a blank image"


@pytest.mark.slow
def test_dry_run_lists_runs_and_their_state(grid):
    cfg, out, _ = grid
    p, _ = _cli(str(cfg), "--out", str(out), "--dry-run")
    assert p.returncode == 0, p.stderr
    listed = [line for line in p.stdout.splitlines() if line.startswith("[")]
    assert len(listed) == 2 and all(" done " in line for line in listed)
    assert {d.name for d in _runs(out).values()} == {line.split()[2] for line in listed}


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_partial_ones(grid):
    """Runs last in this module: it redoes the SGQ run, then checks the outputs again."""
    cfg, out, _ = grid
    runs = _runs(out)
    fp32_result = runs["fp32"] / "result.json"
    before = fp32_result.stat().st_mtime_ns
    # an interrupted SGQ run: no result.json, a leftover file
    (runs["sgq:4"] / "result.json").unlink()
    (runs["sgq:4"] / "leftover").write_text("from an interrupted attempt")
    p, _ = _cli(str(cfg), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{runs['fp32'].name}: done earlier, skipped" in p.stdout
    assert "removing an unfinished earlier attempt" in p.stdout and "ran 1 runs" in p.stdout
    assert not (runs["sgq:4"] / "leftover").exists() and (runs["sgq:4"] / "result.json").is_file()
    assert fp32_result.stat().st_mtime_ns == before
    # everything still agrees after the partial redo
    test_evals_jsonl_matches_the_clients_and_the_cloud(grid)
    test_results_json_agrees_with_the_runs(grid)
    # and a third invocation has nothing left to do
    results = {r: (r / "result.json").stat().st_mtime_ns for r in runs.values()}
    p, _ = _cli(str(cfg), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done earlier, skipped") == 2 and "ran 0 runs" in p.stdout
    assert {r: (r / "result.json").stat().st_mtime_ns for r in runs.values()} == results, "a finished run was redone"


@pytest.mark.slow
def test_failed_runs_are_reported_and_the_grid_goes_on(tmp_path):
    """Shards smaller than one batch: every edge-train exits with an error; both runs are reported."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(CONFIG.replace(SYNTH, "synthetic:n=16,classes=2,shape=1x28x28").replace("name = \"tiny\"",
                                                                                            "name = \"bad\""))
    p, _ = _cli(str(cfg), "--out", str(tmp_path / "out"), timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stdout.count("FAILED") == 2, p.stdout
    assert "fewer than one batch" in p.stdout, "the tail of the failing process's log"
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(report["failed"]) == 2
    assert not list((tmp_path / "out" / "runs").glob("*/result.json"))


# ----------------------------------------------------------------------------- config validation


def _config_error(tmp_path: Path, text: str) -> str:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    result = CliRunner().invoke(X.main, [str(cfg), "--dry-run"])
    assert result.exit_code == 2, result.output
    return result.output


@pytest.mark.parametrize("edit, expected", [
    (("batch_size = 16", "batchsize = 16"), ["[experiment]", "unknown key 'batchsize'", "batch_size"]),
    (('codecs = ["fp32", "sgq:4"]', 'codecs = ["fp32", "sqg:4"]'),
     ["[grid] codecs[1]", "unknown codec 'sqg'", "available: fp32, fp16, uq"]),
    (('codecs = ["fp32", "sgq:4"]', 'codecs = ["randtopk:4"]'), ["codecs[0]", "'randtopk' takes no bits", "rate"]),
    (('codecs = ["fp32", "sgq:4"]', 'codecs = [{name = "uq", params = {bits = 12}}]'), ["codecs[0]", "'bits'"]),
    (('seeds = [0]', 'seeds = [0]\npartitions = ["dirichlet"]'), ["partitions[0]", "dirichlet:ALPHA"]),
    (('clients = [2]', 'clients = [0]'), ["clients[0]", ">= 1"]),
    (('bandwidth = ["50mbit"]', 'bandwidth = ["fast"]'), ["bandwidth[0]", "bad rate 'fast'"]),
    (('steps = [50]', 'steps = [50]\nepochs = [1]'), ["[grid]", "steps or epochs, not both"]),
    (('steps = [50]', ''), ["steps = [...] or epochs = [...]"]),
    (('target_accuracy = 0.9', 'target_accuracy = 90'), ["target_accuracy", "<= 1.0"]),
    (('latency = "5ms"', 'latency = "5 parsecs"'), ["latency", "bad duration"]),
    (('[grid]', '[grid]\nfoo = 1'), ["[grid]", "unknown key 'foo'"]),
    (('[grid]', '[[group]]\ntitle = "x"\n[grid]'), ["[[group]] #1", "'name' is required"]),
    (('name = "tiny"', 'name = "tiny"\n['), ["not valid TOML"]),
    (('batch_size = 16', 'batch_size = 16\nmodel = "nosuch"'), ["[experiment] model", "unknown model 'nosuch'",
                                                               "resnet18"]),
    (('batch_size = 16', 'batch_size = 16\ncut = 10'), ["[experiment] cut (model resnet18)", "cuts 1..9"]),
    (('batch_size = 16', 'batch_size = 16\ncut = "fc"'), ["cut (model resnet18)", "leaves nothing on the server"]),
    (('[grid]', '[[group]]\nname = "g"\nmodel = "shufflenet_v2_x1_0"\ncut = "layer1"\n[grid]'),
     ["[[group]] 'g' cut (model shufflenet_v2_x1_0)", "unknown cut 'layer1'", "stage2"]),
    ((SYNTH, "idx:/nope"), ["[experiment] data", "'idx:/nope'", "directory /nope not found"]),
    (('[grid]', '[[group]]\nname = "g"\ndata = "cifar10:/nope"\n[grid]'),
     ["[[group]] 'g' data", "directory /nope not found"]),
])
def test_config_errors_exit_2_and_name_the_key(tmp_path, edit, expected):
    old, new = edit
    assert old in CONFIG
    out = _config_error(tmp_path, CONFIG.replace(old, new, 1))
    for text in expected:
        assert text in out, (text, out)


def test_run_ids_are_stable_and_follow_the_settings(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    ids = [r.run_id for r, _ in X.load_config(cfg).runs()]
    assert ids == [r.run_id for r, _ in X.load_config(cfg).runs()]
    assert ids[0].startswith("fp32-iid-c2-50mbit-s50-seed0-") and ids[1].startswith("sgq4-iid-c2-50mbit-s50-seed0-")
    assert all(i == _slug(i) for i in ids), "filesystem-safe"
    # what the run computes changes the id; what only the report uses does not
    cfg.write_text(CONFIG.replace("lr = 0.02", "lr = 0.03"))
    assert not set(ids) & {r.run_id for r, _ in X.load_config(cfg).runs()}
    cfg.write_text(CONFIG.replace("target_accuracy = 0.9", "target_accuracy = 0.5").replace('"sgq:4"', '{name = '
                   '"sgq", params = {bits = 4}, label = "SGQ"}'))
    assert ids == [r.run_id for r, _ in X.load_config(cfg).runs()]


def test_groups_share_identical_runs(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG + '\n[[group]]\nname = "a"\ncodecs = ["fp32", "uq:4"]\n'
                   '\n[[group]]\nname = "b"\ncodecs = ["fp32", "slacc"]\npartitions = ["iid", "dirichlet:0.5"]\n')
    exp = X.load_config(cfg)
    assert [len(g.runs) for g in exp.groups] == [2, 4]
    assert len(exp.runs()) == 5, "the IID fp32 run of both groups runs once"


def test_importing_the_command_loads_no_plotting_or_training_stack():
    code = ("import sys, splitedge.lab.experiment as X; X.load_config(sys.argv[1]); "
            "print(sorted(m for m in ('matplotlib', 'torch', 'onnxruntime') if m in sys.modules))")
    cfg = Path(__file__).resolve().parent.parent / "experiments" / "papers.toml"
    p = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_an_omitted_bandwidth_is_the_explicit_unlimited(tmp_path):
    """Without [grid] bandwidth the runs are those of bandwidth = ["unlimited"]: same ids, same
    edge-train command lines, which edge-train accepts (it parses --bandwidth with parse_rate)."""
    from splitedge.wire.shaping import parse_rate

    omitted, explicit, shaped = tmp_path / "omitted.toml", tmp_path / "explicit.toml", tmp_path / "shaped.toml"
    omitted.write_text(CONFIG.replace('bandwidth = ["50mbit"]\n', ""))
    explicit.write_text(CONFIG.replace('"50mbit"', '"unlimited"'))
    shaped.write_text(CONFIG)
    runs = {p.stem: [r for r, _ in X.load_config(p).runs()] for p in (omitted, explicit, shaped)}
    assert [r.run_id for r in runs["omitted"]] == [r.run_id for r in runs["explicit"]]
    assert [r.edge_args() for r in runs["omitted"]] == [r.edge_args() for r in runs["explicit"]]
    assert all("--bandwidth" not in r.edge_args() for r in runs["omitted"])
    assert all(r.describe_setting().startswith("IID, 2 clients, unlimited links") for r in runs["omitted"])
    rates = []
    for r in runs["omitted"] + runs["shaped"]:
        args = r.edge_args()
        rates += [parse_rate(args[i + 1]) for i, a in enumerate(args) if a == "--bandwidth"]
    assert rates == [50e6, 50e6], "the shaped runs pass a rate edge-train parses"


def test_a_config_that_is_not_utf8_exits_2_and_names_the_file(tmp_path):
    cfg = tmp_path / "bin.toml"
    cfg.write_bytes(b'[experiment]\nname = "caf\xe9"\n')
    result = CliRunner().invoke(X.main, [str(cfg), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), "no traceback"
    assert str(cfg) in result.output and "not a UTF-8 text file" in result.output and "0xe9" in result.output


def _invoke(cfg: Path, out: Path, *args: str):
    return CliRunner().invoke(X.main, [str(cfg), "--out", str(out), *args])


def _snapshot(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("args", [(), ("--report-only",), ("--dry-run",)])
def test_a_directory_of_the_users_own_is_refused_untouched(tmp_path, args):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    (mine / "results.md").write_text("my results\n")
    (mine / "config.toml").write_text("my config\n")
    (mine / "plots" / "tiny-accuracy-time.png").write_bytes(b"my plot")
    before = _snapshot(mine)
    result = _invoke(cfg, mine, *args)
    assert result.exit_code == 2, result.output
    assert f"output directory {mine} is not empty" in result.output and X.MARKER in result.output
    assert _snapshot(mine) == before, "nothing written, nothing replaced"


def test_out_is_a_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    (tmp_path / "f").write_text("a file\n")
    # the config's own out (--out's click.Path refuses a file itself)
    cfg.write_text(CONFIG.replace('title = "Tiny grid"', f'title = "Tiny grid"\nout = "{tmp_path / "f"}"'))
    result = CliRunner().invoke(X.main, [str(cfg), "--report-only"])
    assert result.exit_code == 2, result.output
    assert "exists and is not a directory" in result.output and (tmp_path / "f").read_text() == "a file\n"


def test_the_output_directory_is_marked_and_reused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    for out in (tmp_path / "new" / "out", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        first = _invoke(cfg, out, "--report-only")
        assert first.exit_code == 0, first.output
        assert (out / X.MARKER).is_file() and (out / "config.toml").read_text() == CONFIG
        assert "2 grid points not finished" in first.output
        (out / "results.md").write_text("stale\n")
        again = _invoke(cfg, out, "--report-only")
        assert again.exit_code == 0, again.output
        assert (out / "results.md").read_text().startswith("# Tiny grid"), "its own results are rewritten"


def test_an_unmarked_output_of_this_command_is_refused_untouched(tmp_path):
    """Only the marker makes a directory this command's: one laid out like its output (config.toml,
    runs/<id>/settings.json, results.md) but without the marker is refused like any other."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "unmarked"
    run = out / "runs" / "fp32-iid-c2-50mbit-s50-seed0-00000000"
    run.mkdir(parents=True)
    (run / "settings.json").write_text("{}\n")
    (out / "config.toml").write_text(CONFIG)
    (out / "results.md").write_text("old\n")
    (out / "evals.jsonl").write_text("")
    before = _snapshot(out)
    result = _invoke(cfg, out, "--report-only")
    assert result.exit_code == 2, result.output
    assert f"output directory {out} is not empty" in result.output and X.MARKER in result.output
    assert _snapshot(out) == before, "nothing written, nothing replaced"
    (out / X.MARKER).touch()
    result = _invoke(cfg, out, "--report-only")
    assert result.exit_code == 0, result.output
    assert (out / "results.md").read_text().startswith("# Tiny grid"), "a marked directory is resumed"


def test_report_only_needs_no_data(tmp_path):
    """Rebuilding a report reads the runs' results only; the data directory may be gone."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.replace(SYNTH, "idx:/nope"))
    assert _invoke(cfg, tmp_path / "out", "--dry-run").exit_code == 2
    result = _invoke(cfg, tmp_path / "out", "--report-only")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "results.md").is_file()
