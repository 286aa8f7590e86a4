"""edge-train on bad input and failing runs: a one-line message naming the problem, exit code 2 for
bad input (found before training starts), 1 for runtime failures; never a traceback, and nothing of
the user's (an earlier run's checkpoints, the cloud's steps) overwritten or silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitedge.lab import launch
from splitedge.fsutil import CheckpointDir

SYNTH = "synthetic:n=256,classes=10,shape=1x28x28,seed=0"
BATCH = 16


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def _edge(art: Path, *extra: str, port: int | None = None, data: str = SYNTH,
          timeout: float = 180) -> subprocess.CompletedProcess:
    """edge-train run to the end; without ``port``, against a port nobody listens on (--give-up 1)."""
    cmd = launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{port or launch.free_port()}", "--data", data,
        "--batch-size", str(BATCH), "--eval-samples", "32", "--threads", "1", "--no-progress", "--timeout", "1",
        "--give-up", "20" if port else "1", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _clean(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Asserts the exit code, no traceback, and that the last line of stderr (the error) holds each needle."""
    err = res.stderr
    assert res.returncode == code, (res.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: "), err[-3000:]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture
def cloud(art, tmp_path):
    """``cloud(*args) -> port``: a cloud-serve on a free port (stopped at the end of the test); its metrics
    go to tmp_path/metrics.jsonl."""
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> int:
        port = launch.free_port()
        cmd = launch.script("cloud-serve") + [
            "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}", "--threads", "1", "--log-every", "0",
            "--metrics", str(tmp_path / "metrics.jsonl"), *extra]
        procs.append(launch.popen_logged(cmd, tmp_path / "cloud.log", mode="a"))
        return port

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _steps(tmp_path: Path, client: int) -> list[int]:
    return sorted(e["step"] for e in launch.read_jsonl(tmp_path / "metrics.jsonl")
                  if e["event"] == "step" and e["client"] == client)


# ---------------------------------------------------------------------------- 1. a client id the cloud already has


def test_a_fresh_run_with_a_client_id_the_cloud_has_steps_from_is_refused(art, cloud, tmp_path):
    """Run 1 trains 3 steps as client 0. A fresh run 2 with the same id would have skipped those 3
    batches, trained from the initial weights and counted the cloud's steps as its own: refused (exit
    1: the cloud's client_id_taken, a conflict with its state), nothing sent. --resume
    with run 1's checkpoints continues it (steps 4, 5); a --resume with an empty checkpoint directory
    (an edge that crashed before its first checkpoint) still skips."""
    port = cloud("--codec", "uq", "--bits", "4")
    ck = tmp_path / "ck"
    first = _edge(art, "--steps", "3", "--checkpoint-dir", str(ck), "--summary", str(tmp_path / "1.json"), port=port)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _steps(tmp_path, 0) == [1, 2, 3]

    again = _edge(art, "--steps", "5", "--summary", str(tmp_path / "2.json"), port=port)
    _clean(again, 1, "has already applied 3 steps from --client-id 0", "--resume", "another --client-id")
    assert "skipping" not in again.stderr
    assert not (tmp_path / "2.json").exists(), "no summary: nothing was trained"
    assert _steps(tmp_path, 0) == [1, 2, 3], "the refused run sent no step"
    # the cloud refused the HELLO itself: run 1's finished session was not reopened (it would have
    # held FedAvg rounds and --exit-when-done for --client-timeout)
    events = [e["event"] for e in launch.read_jsonl(tmp_path / "metrics.jsonl") if e.get("client") == 0]
    assert "client_done" in events and "client_joined" not in events[events.index("client_done"):], events
    assert "client_id_taken" in again.stderr

    # another id of the same cloud is free
    other = _edge(art, "--steps", "2", "--client-id", "1", "--num-clients", "2", port=port)
    assert other.returncode == 0, other.stderr[-3000:]

    resumed = _edge(art, "--steps", "5", "--checkpoint-dir", str(ck), "--resume", "--summary",
                    str(tmp_path / "3.json"), port=port)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "3.json").read_text())["steps"] == 5
    assert _steps(tmp_path, 0) == [1, 2, 3, 4, 5], "each step applied once"

    empty = tmp_path / "empty-ck"
    empty.mkdir()
    crashed = _edge(art, "--steps", "7", "--checkpoint-dir", str(empty), "--resume", "--summary",
                    str(tmp_path / "4.json"), port=port)
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "skipping 5 batches" in crashed.stderr and "holds no checkpoint yet" in crashed.stderr
    assert _steps(tmp_path, 0) == [1, 2, 3, 4, 5, 6, 7]

    # a --checkpoint-dir that does not exist is a mistyped path, not a run to continue: refused,
    # nothing sent (a run creates its directory when it starts, before its first checkpoint)
    typo = _edge(art, "--steps", "9", "--checkpoint-dir", str(tmp_path / "ck-typo"), "--resume", port=port)
    _clean(typo, 2, f"--checkpoint-dir {tmp_path / 'ck-typo'} does not exist", "leave out --resume")
    assert _steps(tmp_path, 0) == [1, 2, 3, 4, 5, 6, 7] and not (tmp_path / "ck-typo").exists()


# ---------------------------------------------------------------------------- 2. another run's checkpoint directory


def test_a_fresh_run_refuses_a_checkpoint_dir_that_holds_files(art, tmp_path):
    ck = tmp_path / "ck"
    (ck / "ckpt-000000005").mkdir(parents=True)
    (ck / "LATEST").write_text("ckpt-000000005\n")
    res = _edge(art, "--steps", "1", "--checkpoint-dir", str(ck))
    _clean(res, 2, f"--checkpoint-dir {ck} is not empty", "--resume")
    assert (ck / "LATEST").read_text() == "ckpt-000000005\n" and CheckpointDir(ck).latest() == ck / "ckpt-000000005"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "ckpt-000000005"]

    # an empty directory is fine (the run gets as far as the missing cloud)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _edge(art, "--steps", "1", "--checkpoint-dir", str(empty))
    _clean(res, 1, "did not answer HELLO")
    assert list(empty.iterdir()) == [], "the write check leaves nothing behind"


# ---------------------------------------------------------------------------- 3. divergence


def test_a_diverging_run_stops_with_a_message_not_a_traceback(art, cloud, tmp_path):
    """--lr 1e38: after step 1 the edge's activations are NaN/Inf (or, with other numbers, too large for
    SGQ): the codec refused them with a ValueError traceback; now a message naming the step."""
    port = cloud("--codec", "sgq", "--expect-clients", "1", "--exit-when-done")
    ck = tmp_path / "ck"
    res = _edge(art, "--steps", "5", "--lr", "1e38", "--checkpoint-dir", str(ck), "--checkpoint-every", "1",
                "--summary", str(tmp_path / "s.json"), port=port)
    last = _clean(res, 1, "training diverged at step 2", "learning rate too high")
    assert "NaN/Inf" in last or "cannot be encoded" in last, last
    assert f"the last checkpoint saved is {ck / 'ckpt-000000001'}" in last
    assert not (tmp_path / "s.json").exists()
    assert _steps(tmp_path, 0) == [1], "nothing non-finite reached the cloud"
    events = launch.read_jsonl(tmp_path / "metrics.jsonl"); import shutil; shutil.copy(tmp_path / "metrics.jsonl", "/tmp/m.jsonl")
    assert [e["reason"] for e in events if e["event"] == "client_done"] == ["diverged"], "the edge said BYE"


# ---------------------------------------------------------------------------- 4. damaged artifacts and checkpoints


def _damage(src: Path, dst: Path, rel: str | None, files: dict | None = None) -> Path:
    """A copy of the artifacts with ``rel`` truncated and manifest.json updated to its new sha256 (the
    integrity check passes: only ONNX Runtime can tell); ``files`` replaces the manifest's map."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    if rel is not None:
        p = dst / rel
        data = p.read_bytes()[: p.stat().st_size // 2]
        p.write_bytes(data)
        m["files"][rel] = hashlib.sha256(data).hexdigest()
    if files is not None:
        m["files"] = files
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("rel", ["client/checkpoint", "client/training_model.onnx", "client/inference_model.onnx"])
def test_damaged_artifacts_with_matching_checksums_are_named(art, tmp_path, rel):
    bad = _damage(art, tmp_path / "art", rel)
    res = _edge(bad, "--steps", "1")
    _clean(res, 2, f"{bad / rel} cannot be loaded by ONNX Runtime", "re-export")


def test_a_manifest_that_lists_no_client_files_is_refused(art, tmp_path):
    """An empty "files" map would skip the integrity check altogether."""
    bad = _damage(art, tmp_path / "art", None, files={})
    res = _edge(bad, "--steps", "1")
    _clean(res, 2, "manifest.json lists no sha256 for client/training_model.onnx")


def test_resume_from_a_damaged_edge_checkpoint_names_it_and_an_earlier_one(art, tmp_path):
    from helpers import edge_run_identity

    ck = tmp_path / "ck"
    run = edge_run_identity(art, SYNTH, BATCH)
    for step in (5, 10):
        d = ck / f"ckpt-{step:09d}"
        d.mkdir(parents=True)
        (d / "edge_progress.json").write_text(json.dumps({"step": step, "epoch": 0, "batch": step, "run": run}))
        (d / "edge_checkpoint").write_bytes(b"\0not an ORT checkpoint" * 50)
    (ck / "LATEST").write_text("ckpt-000000010\n")
    res = _edge(art, "--steps", "20", "--checkpoint-dir", str(ck), "--resume")
    _clean(res, 2, f"--resume: {ck / 'ckpt-000000010' / 'edge_checkpoint'} cannot be loaded by ONNX Runtime",
           f"writing its name (ckpt-000000005) into {ck / 'LATEST'}", "start fresh")
    assert (ck / "LATEST").read_text() == "ckpt-000000010\n"


# ---------------------------------------------------------------------------- 5. and 6. places that cannot be written


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, where nothing can be created")
@pytest.mark.parametrize("option, path, needle", [
    ("--checkpoint-dir", "/proc/splitedge-ck", "--checkpoint-dir /proc/splitedge-ck cannot be created or written"),
    ("--summary", "/proc/splitedge-nope/x.json", "--summary /proc/splitedge-nope/x.json: its directory"),
])
def test_unwritable_output_places_are_refused_before_training(art, option, path, needle):
    res = _edge(art, "--steps", "1", option, path)
    _clean(res, 2, needle)


def _bare_client(tmp_path: Path, **cfg):
    """An EdgeClient with only what save_checkpoint and run's ending need (no model, no cloud)."""
    from splitedge.runtime_edge.client import EdgeClient, EdgeConfig, Progress

    c = EdgeClient.__new__(EdgeClient)
    c.cfg = EdgeConfig(artifacts=str(tmp_path), **cfg)
    c.progress = Progress(step=7)
    return c


class _FailingModel:
    def save_checkpoint(self, path):
        raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_claims_no_previous_one_when_there_is_none(tmp_path, caplog):
    c = _bare_client(tmp_path)
    c.model = _FailingModel()
    c.manifest = None
    c._run_identity = lambda: {}
    c.ckpt = CheckpointDir(tmp_path / "ck")
    with caplog.at_level(logging.ERROR, logger="edge-train"):
        c.save_checkpoint()
    assert "edge checkpoint at step 7 failed" in caplog.text and "no checkpoint has been saved" in caplog.text
    assert "intact" not in caplog.text
    caplog.clear()
    prev = c.ckpt.write("000000005", lambda d: (d / "edge_progress.json").write_text("{}"))
    with caplog.at_level(logging.ERROR, logger="edge-train"):
        c.save_checkpoint()
    assert f"the previous one is intact ({prev.name})" in caplog.text
    assert c.ckpt.latest() == prev


def test_a_late_summary_write_failure_names_the_option_and_keeps_the_result(tmp_path, monkeypatch):
    """The directory was writable at startup but the write fails at the end (here: a directory now
    stands where the file goes): SummaryError names --summary, and carries the summary; edge-train
    prints the result line and exits 1."""
    from click.testing import CliRunner

    from splitedge.runtime_edge import cli, client

    target = tmp_path / "s.json"
    c = _bare_client(tmp_path, summary=str(target))
    c.planned_steps = 0
    c.ckpt = None
    c.cfg.progress = False
    c.hello = lambda: None
    c.evaluate = lambda: {"accuracy": 0.5}
    c._bye = lambda reason: None
    c.summary = lambda final: {"client_id": 0, "final_accuracy": final["accuracy"], "steps": 7, "bytes_sent": 1,
                               "bytes_received": 2, "wall_time_s": 0.1}
    c.ep = type("Ep", (), {"close": lambda self, linger_ms=0: None})()
    target.mkdir()
    with pytest.raises(client.SummaryError, match=r"--summary .*s\.json could not be written") as e:
        c.run()
    assert e.value.summary["steps"] == 7

    class Stub:
        @classmethod
        def prepare(cls, cfg):
            return cls()

        def request_stop(self, signum, frame=None):
            pass

        def run(self):
            raise client.SummaryError("--summary x could not be written (disk full); the run itself completed",
                                      {"client_id": 0, "final_accuracy": 0.5, "steps": 7, "bytes_sent": 1,
                                       "bytes_received": 2, "wall_time_s": 0.1})

    monkeypatch.setattr(client, "EdgeClient", Stub)
    monkeypatch.setenv("SPLITEDGE_NO_LOG_SETUP", "1")
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    res = CliRunner().invoke(cli.main, ["--artifacts", str(tmp_path), "--data", SYNTH, "--steps", "1"])
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout.splitlines()[0])["steps"] == 7
    assert "--summary x could not be written" in res.output
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, \
        "edge-train's main() gives back the signal handlers it found (it may run inside another program)"


# ---------------------------------------------------------------------------- 7. bad input is exit code 2


@pytest.mark.parametrize("case", ["missing secret", "junk secret", "missing server key", "short keys",
                                  "short server key"])
def test_bad_key_files_are_bad_input(art, tmp_path, case):
    import zmq.auth  # not imported by "import zmq"

    good = tmp_path / "keys"
    good.mkdir()
    public, secret = zmq.auth.create_certificates(str(good), "client")
    junk = tmp_path / "junk.key_secret"
    junk.write_text("not a certificate\n")
    short = tmp_path / "short.key_secret"  # a certificate whose keys are not 40 Z85 characters
    short.write_text('metadata\ncurve\n    public-key = "short"\n    secret-key = "alsoshort"\n')
    secret_file, server_file, needle = {
        "missing secret": (tmp_path / "nope.key_secret", public, "--curve-secret: key file"),
        "junk secret": (junk, public, "--curve-secret: "),
        "missing server key": (secret, tmp_path / "nope.key", "--server-key: key file"),
        "short keys": (short, public, "is not a CurveZMQ key"),
        "short server key": (secret, short, "--server-key: "),
    }[case]
    res = _edge(art, "--steps", "1", "--curve-secret", str(secret_file), "--server-key", str(server_file))
    _clean(res, 2, needle)


@pytest.mark.parametrize("data, extra, needle", [
    ("synthetic:n=64,classes=10,shape=3x32x32", (), "has inputs 3x32x32 but the artifacts expect 1x28x28"),
    ("synthetic:n=64,classes=20,shape=1x28x28", (), "has 20 classes but the artifacts' head has 10"),
    ("synthetic:n=64,classes=10,shape=1x28x28", ("--batch-size", "128"), "fewer than one batch of 128"),
    # a size whose arrays cannot be allocated: refused by value and limit, not a MemoryError
    ("synthetic:n=10000000000000", (), ("synthetic parameter n=10000000000000 is too large",
                                         "over the limit of 2147483648 bytes (684784 samples of this shape)")),
])
def test_data_that_does_not_fit_is_bad_input(art, data, extra, needle):
    res = _edge(art, "--steps", "1", *extra, data=data)
    _clean(res, 2, *(needle if isinstance(needle, tuple) else (needle,)))


# ---------------------------------------------------------------------------- 8. Ctrl-C while onnxruntime loads


def test_ctrl_c_is_held_back_until_onnxruntime_is_loaded():
    """A SIGINT inside the block runs no handler there; KeyboardInterrupt comes once the block is done."""
    from splitedge.runtime_edge.ort_backend import _sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt), _sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between bytecodes of the main thread
            time.sleep(0.001)
        done.append(True)
    assert done == [True], "the block ran to its end"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("delay", [0.6, 1.0, 1.4])
def test_ctrl_c_at_startup_prints_no_torch_lines_and_does_not_abort(art, delay):
    """edge-train imports onnxruntime's training build, which imports torch (not edge-train's own code).
    A Ctrl-C while that loads aborted the process (pybind11 terminate) or left torch's exit hook printing
    "FakeTensor cache stats" through edge-train's log. Wherever the signal lands, neither happens."""
    p = subprocess.Popen(launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{launch.free_port()}", "--data", SYNTH, "--steps",
        "1", "--give-up", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1, (p.returncode, out[-3000:])
    assert "FakeTensor" not in out and "terminate called" not in out, out[-3000:]


def test_edge_train_code_itself_does_not_import_torch():
    """Everything of edge-train but the ORT backend loads without torch; torch comes in only through
    onnxruntime's training package (onnxruntime/training/optim/_modifier.py imports it)."""
    code = ("import sys\n"
            "import splitedge.runtime_edge.cli, splitedge.runtime_edge.client\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resume_mismatch_names_each_difference_and_falls_back_to_the_shard_plan():
    from splitedge.runtime_edge.resume import ResumeMismatch
    from splitedge.runtime_edge.resume import check_resume as _check_resume

    run = {"model": "resnet18", "cut": 3, "artifacts": "a" * 32, "client_id": 0, "batch_size": 32,
           "data": "fashion-mnist", "partition": "iid", "seed": 0, "num_clients": 2, "partition_plan": "p1"}
    _check_resume(run, dict(run), "ck")  # the same run: nothing to say
    _check_resume(run, {"model": "resnet18", "cut": 3, "artifacts": "a" * 32}, "ck")  # the artifacts check alone
    with pytest.raises(ResumeMismatch, match=r'different --seed \(0 there, 3 here\); --num-clients \(2 there, 4 here\)'):
        _check_resume(run, {**run, "seed": 3, "num_clients": 4, "partition_plan": "p2"}, "ck")
    with pytest.raises(ResumeMismatch, match="the data set's files changed"):
        _check_resume(run, {**run, "partition_plan": "p2"}, "ck")
    # the same data spelled otherwise is the same plan: accepted
    _check_resume(run, {**run, "data": "fashion-mnist:/usr/share/datasets/fashion-mnist"}, "ck")


def test_folder_images_are_resized_to_the_artifacts_input_size(exported, tmp_path):
    """folder: data is read at the artifacts' H x W (here 32x32 from 40x24 PNGs), so edge-train gets
    past the data checks to the connection (nobody listens: exit 1 after --give-up), instead of
    refusing the data as 3x64x64."""
    from PIL import Image

    art3 = exported("resnet18", 3, input_shape=(3, 32, 32))
    root = tmp_path / "imgs"
    root.mkdir()
    rows = ["filename,label"]
    for i in range(40):
        Image.new("RGB", (40, 24), (6 * i, 255 - 6 * i, 100)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    res = _edge(art3, data=f"folder:{root}")
    _clean(res, 1, "did not answer HELLO", "is cloud-serve running")
    assert "3x64x64" not in res.stderr


def test_summary_replaces_an_earlier_summary_but_never_another_file(art, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes\n")
    res = _edge(art, "--steps", "1", "--summary", str(notes))
    _clean(res, 2, f"--summary {notes} exists and is not an edge-train summary: refusing to overwrite it")
    assert notes.read_text() == "my precious notes\n"
    earlier = tmp_path / "s.json"
    earlier.write_text(json.dumps({"client_id": 0, "final_accuracy": 0.5, "steps": 3}))
    res = _edge(art, "--steps", "1", "--summary", str(earlier))  # accepted: fails later, at the connection
    _clean(res, 1, "did not answer HELLO")


def test_halves_of_different_exports_are_named_on_both_sides(art, exported, cloud, tmp_path):
    """An edge half exported separately (same model, cut and shapes, another seed) trains against the
    cloud -- re-exporting one half can be deliberate -- but both sides warn that the halves do not come
    from one export; an edge of the cloud's own export gets no such warning."""
    other = exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02, seed=1)
    port = cloud("--codec", "uq", "--bits", "4")
    res = _edge(other, "--steps", "1", port=port)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the cloud serves another export of resnet18 cut 3" in res.stderr
    same = _edge(art, "--steps", "1", "--client-id", "1", "--num-clients", "2", port=port)
    assert same.returncode == 0 and "another export" not in same.stderr, same.stderr[-3000:]
    differ = {e["client"] for e in launch.read_jsonl(tmp_path / "metrics.jsonl") if e["event"] == "artifacts_differ"}
    assert differ == {0}, "once per HELLO of the other export's edge (a retried HELLO counts again), never client 1"
    assert "trains the edge half of another export" in (tmp_path / "cloud.log").read_text()
    # a board's bundle lists only client/ in its manifest: the same export still matches
    from splitedge.export import manifest as mf
    from splitedge.profiles.bundle import _artifact_entries

    entries, _ = _artifact_entries(art)
    narrowed = mf.Manifest.from_dict(json.loads(entries["artifacts/manifest.json"]))
    assert mf.client_digest(narrowed) == mf.client_digest(mf.load(art)) != mf.client_digest(mf.load(other))
