"""Bad input to ``cloud-serve`` and ``splitedge bench load``: refused with exit code 2 and a one-line
message naming the problem (never a traceback), and nothing of the user's is deleted.

* ``--bind ipc://PATH``: ZeroMQ deletes whatever is at PATH before binding, so an existing file
  or directory, a live server's socket and a missing directory are refused; a stale socket is
  replaced. ``--connect`` may name a socket that does not exist yet.
* damaged server weights in the artifacts, damaged files in the checkpoint ``--resume`` reads;
* a ``--checkpoint-dir`` or ``--metrics`` that cannot be written (checked at startup);
* checkpoint retention: a checkpoint at the step of an earlier one supersedes it instead of
  taking a ``--keep-checkpoints`` slot, so restarts do not push real checkpoints out;
* ``bench load`` with a directory that holds no artifacts, or an unwritable ``--json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zmq

from helpers import CliResult, bin_path, run_cli
from splitedge import codecs as sc
from splitedge.lab import launch
from splitedge.wire import protocol as P
from splitedge.fsutil import CheckpointDir, atomic_write_json
from splitedge.wire.transport import check_bind_endpoint, check_connect_endpoint, server_socket

ACT = (64, 14, 14)  # ResNet-18 cut 3 for 1x28x28


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def _run(*argv: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess | CliResult:
    """A command that must be refused at startup: in this process (click's CliRunner), or as a
    subprocess where it needs its own working directory."""
    if cwd is None:
        return run_cli(*argv)
    cmd = launch.script(argv[0]) if argv[0] == "cloud-serve" else [bin_path(argv[0])]
    return subprocess.run(cmd + list(argv[1:]), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _refused(res: subprocess.CompletedProcess | CliResult, *needles: str) -> str:
    """The error line of a run that must have been refused with exit 2, no traceback, naming ``needles``."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- 1. --bind ipc://


def test_bind_ipc_never_deletes_a_file_or_a_directory(tmp_path):
    (tmp_path / "text.txt").write_text("the user's notes\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep").write_text("x")
    for target, kind in (("text.txt", "is a file"), ("adir", "is a directory")):
        res = _run("cloud-serve", "--artifacts", "art", "--bind", f"ipc://{target}", cwd=tmp_path)
        _refused(res, "--bind", repr(target), kind, "not a socket")
    res = _run("cloud-serve", "--artifacts", "art", "--bind", f"ipc://{tmp_path}/nodir/cloud.sock")
    _refused(res, "--bind", f"the directory '{tmp_path}/nodir' does not exist")
    assert (tmp_path / "text.txt").read_text() == "the user's notes\n"
    assert (tmp_path / "adir" / "keep").read_text() == "x"
    assert not (tmp_path / "nodir").exists()


def test_server_socket_itself_refuses_to_bind_over_a_file(tmp_path):
    """The check is also where the socket is bound (ServeConfig used from Python, not the CLI)."""
    f = tmp_path / "data.bin"
    f.write_bytes(b"\x00\x01")
    with pytest.raises(OSError, match="exists and is a file"):
        server_socket(zmq.Context.instance(), f"ipc://{f}")
    assert f.read_bytes() == b"\x00\x01"


def test_bind_ipc_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a killed server leaves behind
    assert stale.is_socket()
    assert check_bind_endpoint(f"ipc://{stale}") == f"ipc://{stale}"
    ep = server_socket(zmq.Context.instance(), f"ipc://{stale}")
    try:
        # ZeroMQ now listens there: a client gets through, and a second server is refused
        c = zmq.Context.instance().socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.connect(f"ipc://{stale}")
        c.send(b"hello")
        got = ep.recv(timeout_ms=10_000)
        c.close()
        assert got is not None and got[1][0].bytes == b"hello"
        with pytest.raises(ValueError, match="another process is listening"):
            check_bind_endpoint(f"ipc://{stale}")
    finally:
        ep.close()

    live = tmp_path / "live.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(live))
    srv.listen(1)
    try:
        res = _run("cloud-serve", "--artifacts", "art", "--bind", f"ipc://{live}")
        _refused(res, "--bind", "another process is listening")
        assert live.is_socket()
    finally:
        srv.close()


def test_connect_ipc_may_name_a_socket_that_does_not_exist_yet(tmp_path):
    for ok in (f"ipc://{tmp_path}/later.sock", f"ipc://{tmp_path}/nodir/later.sock", "tcp://127.0.0.1:5555"):
        assert check_connect_endpoint(ok) == ok
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a socket"):
        check_connect_endpoint(f"ipc://{tmp_path}/notes.txt")
    # wildcard and abstract names have no file to check
    assert check_bind_endpoint("ipc://*") == "ipc://*"
    assert check_bind_endpoint("ipc://@splitedge-test") == "ipc://@splitedge-test"


# ---------------------------------------------------------------------------- 2. damaged server files


def _damage_weights(art: Path, dst: Path, *, empty_files: bool) -> Path:
    shutil.copytree(art, dst)
    w = dst / "server" / "model.safetensors"
    w.write_bytes(b"\xff" * 64 + b"not a safetensors file")
    m = json.loads((dst / "manifest.json").read_text())
    if empty_files:
        m["files"] = {}
    else:  # the checksum matches the garbage: only reading the file can tell
        m["files"]["server/model.safetensors"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("empty_files", [False, True], ids=["matching-sha256", "empty-files-map"])
def test_garbage_server_weights_in_the_artifacts(art, tmp_path, empty_files):
    bad = _damage_weights(art, tmp_path / "art", empty_files=empty_files)
    res = _run("cloud-serve", "--artifacts", str(bad), "--bind", f"tcp://127.0.0.1:{launch.free_port()}")
    if empty_files:  # a file the manifest does not list cannot be checked: refused before it is read
        _refused(res, "lists no sha256 for server/model.safetensors", "export-client")
    else:
        _refused(res, str(bad / "server" / "model.safetensors"), "not a readable safetensors file", "export-client")


def test_server_weights_of_another_model(art, tmp_path):
    """A valid safetensors file that holds other tensors: named, in one line (not torch's list)."""
    from safetensors.torch import save_file
    import torch

    bad = _damage_weights(art, tmp_path / "art", empty_files=False)
    w = bad / "server" / "model.safetensors"
    save_file({"x": torch.zeros(3)}, str(w))
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["server/model.safetensors"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(m))
    res = _run("cloud-serve", "--artifacts", str(bad), "--bind", f"tcp://127.0.0.1:{launch.free_port()}")
    _refused(res, "model.safetensors", "does not hold the weights of resnet18 cut 3", "1 unexpected (e.g. 'x')")


def _checkpoints(art: Path, root: Path, tags: list[int]) -> CheckpointDir:
    """Real cloud checkpoints (what CloudServer._checkpoint writes) at these server steps."""
    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import ServerModel

    m = mf.load(art)
    model = ServerModel(art, m, optimizer="sgd", lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    model.train_step(rng.standard_normal((4, *ACT)).astype(np.float32), np.array([0, 1, 2, 3]))  # optimizer state
    cd = CheckpointDir(root, keep=3)
    for step in tags:
        def write(d: Path, step=step) -> None:
            model.save(d)
            atomic_write_json(d / "server_state.json", {"format_version": 1, "server_step": step, "model": m.model,
                                                        "cut": m.cut, "clients": {"0": {"last_step": step, "done": False}}})
        cd.write(f"{step:09d}", write)
    return cd


@pytest.mark.parametrize("name", ["server_model.safetensors", "server_optimizer.safetensors", "server_state.json",
                                  "server_optimizer.json"])
@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_earlier_checkpoint(art, tmp_path, name):
    root = tmp_path / "ckpt"
    cd = _checkpoints(art, root, [5, 10])
    latest = cd.latest()
    assert latest == root / "ckpt-000000010"
    f = latest / name
    f.write_bytes(f.read_bytes()[: 40])  # truncated (a disk that failed under it, a copy cut short)
    before = _tree(root)
    res = _run("cloud-serve", "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}",
               "--checkpoint-dir", str(root), "--resume", "--momentum", "0.9")
    _refused(res, str(f), "ckpt-000000010 is damaged", "earlier checkpoint ckpt-000000005",
             f"echo ckpt-000000005 > {root / 'LATEST'}", "without --resume")
    assert _tree(root) == before, "nothing in the checkpoint directory changed"


@pytest.mark.slow
def test_resume_from_the_only_checkpoint_damaged(art, tmp_path):
    root = tmp_path / "ckpt"
    cd = _checkpoints(art, root, [7])
    (cd.latest() / "server_state.json").write_text('{"server_step": 7, "model": ')
    res = _run("cloud-serve", "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}",
               "--checkpoint-dir", str(root), "--resume")
    _refused(res, "server_state.json: not valid JSON", "no earlier checkpoint is kept", "without --resume")


def _resumed_banner(art: Path, root: Path, tmp_path: Path, *extra: str) -> str:
    """Starts cloud-serve --resume from ``root``, waits for its 'server optimizer' line, stops it (SIGINT)."""
    import time

    err = tmp_path / "cloud.err"
    with err.open("w") as fh:
        proc = subprocess.Popen([bin_path("cloud-serve"), "--artifacts", str(art), "--bind",
                                 f"tcp://127.0.0.1:{launch.free_port()}", "--checkpoint-dir", str(root), "--resume",
                                 *extra], stdout=subprocess.DEVNULL, stderr=fh)
    try:
        deadline = time.monotonic() + 120
        while "serving resnet18" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return err.read_text()


@pytest.mark.slow
def test_resume_takes_the_checkpoints_optimizer_settings_unless_given(art, tmp_path):
    """The checkpoint was written with lr 0.01, momentum 0.9. A --resume without --lr/--momentum keeps
    them (cloud-serve's defaults, lr 0.01 and momentum 0, must not replace them silently); --lr given
    on the command line replaces the checkpoint's lr, and the banner and the next checkpoint say so."""
    root = tmp_path / "ckpt"
    _checkpoints(art, root, [5])
    out = _resumed_banner(art, root, tmp_path)
    assert "server optimizer sgd: lr 0.01, momentum 0.9, weight_decay 0 (the checkpoint's" in out, out
    assert "server sgd lr 0.01, momentum 0.9" in out, out
    out = _resumed_banner(art, root, tmp_path, "--lr", "0.002")
    assert "lr 0.002, momentum 0.9" in out and "--lr 0.002 replaces the checkpoint's 0.01" in out, out
    saved = json.loads((CheckpointDir(root).latest() / "server_optimizer.json").read_text())
    assert saved["param_groups"][0]["lr"] == 0.002 and saved["param_groups"][0]["momentum"] == 0.9, saved


def test_a_damaged_checkpoint_is_refused_before_anything_is_loaded(art, tmp_path):
    """ServerModel.load checks every file before replacing anything: after a refused load the model
    and optimizer are as they were."""
    import torch

    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import CorruptFile, ServerModel

    cd = _checkpoints(art, tmp_path / "ckpt", [3])
    (cd.latest() / "server_optimizer.safetensors").write_bytes(b"\x00" * 16)
    fresh = ServerModel(art, mf.load(art), momentum=0.9)
    weights = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CorruptFile, match="server_optimizer.safetensors"):
        fresh.load(cd.latest())
    assert all(torch.equal(weights[k], v) for k, v in fresh.model.state_dict().items())
    assert not fresh.opt.state_dict()["state"]


# ---------------------------------------------------------------------------- 3. unwritable outputs


@pytest.mark.parametrize("where", ["/proc/splitedge-ck", "FILE/ck"])
def test_an_unwritable_checkpoint_dir_is_refused_at_startup(art, tmp_path, where):
    (tmp_path / "FILE").write_text("x")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    res = _run("cloud-serve", "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}",
               "--checkpoint-dir", where)
    _refused(res, "--checkpoint-dir", where)


@pytest.mark.parametrize("where", ["/proc/splitedge-metrics.jsonl", "/proc/nodir/m.jsonl", "FILE/m.jsonl"])
def test_an_unwritable_metrics_file_is_refused_at_startup(art, tmp_path, where):
    (tmp_path / "FILE").write_text("x")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    res = _run("cloud-serve", "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}",
               "--metrics", where)
    line = _refused(res, "--metrics")
    assert str(Path(where).parent) in line


def test_the_writability_checks_leave_nothing_behind(tmp_path):
    from splitedge.fsutil import check_writable_dir, check_writable_file

    check_writable_dir(tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == []
    check_writable_file(tmp_path / "m" / "metrics.jsonl")
    assert not (tmp_path / "m" / "metrics.jsonl").exists()
    (tmp_path / "old.jsonl").write_text('{"event": "step"}\n')
    check_writable_file(tmp_path / "old.jsonl")
    assert (tmp_path / "old.jsonl").read_text() == '{"event": "step"}\n'


# ---------------------------------------------------------------------------- 4. checkpoint retention


def _fill(d: Path) -> None:
    (d / "state.json").write_text(json.dumps({"dir": d.name}))


def test_a_checkpoint_at_the_same_step_supersedes_the_earlier_one(tmp_path):
    cd = CheckpointDir(tmp_path, keep=2)
    cd.write("000000100", _fill)
    cd.write("000000200", _fill)
    for _ in range(4):  # e.g. a final checkpoint at shutdown, then restarts that stop at once
        new = cd.write("000000200", _fill)
        # LATEST names the new one, complete; the older one of that step is gone; step 100 kept its slot
        assert cd.latest() == new and (new / "state.json").exists()
        assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000100", new.name]
    cd.write("000000300", _fill)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [new.name, "ckpt-000000300"]


def test_a_failed_write_at_the_same_step_keeps_the_earlier_one(tmp_path):
    cd = CheckpointDir(tmp_path, keep=2)
    first = cd.write("000000100", _fill)

    def fails(d: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        cd.write("000000100", fails)
    assert cd.latest() == first and sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-000000100"]


def _train(port: int, steps: int) -> None:
    """Says HELLO as client 0 and applies ``steps`` TRAIN steps (each waits for its GRAD)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        def ask(frames: list) -> P.Message:
            s.send_multipart(frames)
            assert s.poll(120_000), "no reply from cloud-serve"
            return P.unpack(s.recv_multipart())

        welcome = ask(P.pack(P.MsgType.HELLO, {"id": 1,
            "client_id": 0, "num_clients": 1, "model": "resnet18", "cut": 3, "activation_shape": list(ACT),
            "input_shape": [1, 28, 28], "num_classes": 10, "samples": 100, "resume_step": 0, "planned_steps": 10**6}))
        assert welcome.type == P.MsgType.WELCOME, welcome.header
        first = welcome.header["last_step"] + 1
        enc = sc.get("uq", bits=4)
        rng = np.random.default_rng(0)
        for step in range(first, first + steps):
            blob = enc.encode(rng.standard_normal((4, *ACT)).astype(np.float32), step=step, total_rounds=100)
            labels = np.array([0, 1, 2, 3], dtype="<i8").tobytes()
            grad = ask(P.pack(P.MsgType.TRAIN, {"id": 2, "step": step, "n": 4, "round": step, "total_rounds": 100,
                                                "encode_ms": 0.0}, [blob, labels]))
            assert grad.type == P.MsgType.GRAD and grad.header["step"] == step, grad.header
    finally:
        s.close()


@pytest.mark.slow
def test_restarts_do_not_push_real_checkpoints_out(art, tmp_path):
    """cloud-serve checkpoints every 2 server steps, keeps 2: after 4 steps it holds steps 2 and 4;
    its final checkpoint at shutdown (step 4 again) and two restarts with --resume that stop at
    once each write another checkpoint of step 4, which replace the earlier one of step 4 -- step 2
    is still there."""
    root = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"

    def cloud(*extra: str) -> tuple[subprocess.Popen, int]:
        port = launch.free_port()
        cmd = launch.script("cloud-serve") + [
            "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}", "--codec", "uq", "--bits", "4",
            "--threads", "1", "--checkpoint-dir", str(root), "--checkpoint-every", "2", "--keep-checkpoints", "2",
            "--metrics", str(metrics), "--log-every", "0", *extra]
        return subprocess.Popen(cmd, stdout=open(tmp_path / "cloud.log", "a"), stderr=subprocess.STDOUT), port

    def stop(p: subprocess.Popen) -> None:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 0, (tmp_path / "cloud.log").read_text()[-3000:]

    def kept() -> list[int]:
        steps = []
        for d in sorted(root.glob("ckpt-*")):
            steps.append(json.loads((d / "server_state.json").read_text())["server_step"])
        return steps

    p, port = cloud()
    try:
        _train(port, 4)
        stop(p)
        assert [e["server_step"] for e in launch.read_jsonl(metrics) if e["event"] == "checkpoint"] == [2, 4, 4]
        assert kept() == [2, 4]
        for _ in range(2):
            p, port = cloud("--resume")
            _train(port, 0)  # started and serving (it answered a HELLO): its shutdown checkpoint is at step 4
            stop(p)
            assert kept() == [2, 4]
            latest = CheckpointDir(root).latest()
            assert json.loads((latest / "server_state.json").read_text())["server_step"] == 4
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert [e["event"] for e in launch.read_jsonl(metrics)].count("resume") == 2


# ---------------------------------------------------------------------------- 5./6. bench load


def test_bench_load_with_a_directory_that_is_not_artifacts(tmp_path):
    (tmp_path / "userdir").mkdir()
    res = _run("splitedge", "bench", "load", "--artifacts", str(tmp_path / "userdir"))
    _refused(res, "--artifacts", "manifest.json not found", "not an export-client artifact directory")
    assert "exporting" not in res.stdout


def test_bench_load_with_a_truncated_manifest(art, tmp_path):
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    text = (bad / "manifest.json").read_text()
    (bad / "manifest.json").write_text(text[: len(text) // 2])
    res = _run("splitedge", "bench", "load", "--artifacts", str(bad))
    _refused(res, "--artifacts", "manifest.json")


@pytest.mark.parametrize("where", ["/proc/splitedge-load.json", "FILE/load.json"])
def test_bench_load_checks_json_before_running(tmp_path, where):
    (tmp_path / "FILE").write_text("x")
    where = where.replace("FILE", str(tmp_path / "FILE"))
    res = _run("splitedge", "bench", "load", "--json", where)
    _refused(res, "--json")
    assert "exporting" not in res.stdout, "refused before the benchmark started"


@pytest.mark.slow
def test_a_fresh_run_refuses_a_checkpoint_dir_with_an_earlier_runs_checkpoints(art, tmp_path):
    """Without --resume, a new run would point LATEST at its own checkpoints and prune the earlier
    run's: refused, the directory unchanged."""
    root = tmp_path / "ckpt"
    _checkpoints(art, root, [5])
    before = _tree(root)
    res = _run("cloud-serve", "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{launch.free_port()}",
               "--checkpoint-dir", str(root))
    _refused(res, "--checkpoint-dir", "holds the checkpoints of an earlier run", "--resume")
    assert _tree(root) == before


# ---------------------------------------------------------------------------- sessions and step ids, in-process


class _Harness:
    """A CloudServer driven in-process: messages go straight to its dispatcher, replies are recorded."""

    def __init__(self, art: Path, tmp_path: Path, **cfg):
        import logging

        from splitedge.runtime_cloud.server import CloudServer, ServeConfig

        logging.getLogger("cloud-serve").setLevel(logging.ERROR)
        self.server = CloudServer(ServeConfig(artifacts=str(art), bind=f"tcp://127.0.0.1:{launch.free_port()}",
                                              codec=sc.CodecSpec("uq", {"bits": 4}), **cfg))
        self.replies: list[tuple[bytes, P.Message]] = []

        def send(frames, identity=None):
            self.replies.append((identity, P.unpack([bytes(f) for f in frames])))
            return sum(len(bytes(f)) for f in frames)

        self.server.ep.send = send

    def ask(self, identity: bytes, type_: P.MsgType, header: dict, frames=()) -> P.Message:
        """Sends a request numbered as an edge numbers them; its one reply, which must name that id."""
        self.replies.clear()
        self.next_id = getattr(self, "next_id", 0) + 1
        header = {"id": self.next_id, **header}
        self.server._dispatch(identity, [bytes(f) for f in P.pack(type_, header, list(frames))])
        assert len(self.replies) == 1 and self.replies[0][0] == identity, self.replies
        assert self.replies[0][1].header["reply_to"] == self.next_id, self.replies[0][1].header
        return self.replies[0][1]

    def hello(self, identity: bytes, client_id: int, **over) -> P.Message:
        return self.ask(identity, P.MsgType.HELLO, {
            "client_id": client_id, "num_clients": 4, "model": "resnet18", "cut": 3, "activation_shape": list(ACT),
            "input_shape": [1, 28, 28], "num_classes": 10, "samples": 100, "resume_step": 0, "planned_steps": 10,
            **over})

    def train(self, identity: bytes, step: int) -> P.Message:
        blob = sc.get("uq", bits=4).encode(np.random.default_rng(step).standard_normal((4, *ACT)).astype(np.float32),
                                           step=step, total_rounds=10)
        return self.ask(identity, P.MsgType.TRAIN, {"step": step, "n": 4, "round": step, "total_rounds": 10,
                                                    "encode_ms": 0.0}, [blob, np.arange(4, dtype="<i8").tobytes()])

    def eval(self, identity: bytes) -> P.Message:
        blob = sc.get("uq", bits=4).encode(np.zeros((2, *ACT), np.float32))
        return self.ask(identity, P.MsgType.EVAL, {"n": 2, "has_labels": False}, [blob])

    def close(self) -> None:
        self.server.ep.close()


@pytest.fixture
def harness(art, tmp_path):
    made = []

    def make(**cfg) -> _Harness:
        made.append(_Harness(art, tmp_path, **cfg))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_a_version_1_edge_gets_a_version_error_it_can_read(harness):
    """Protocol version 2: a version-1 edge's HELLO is answered by an ERROR framed as version 1 (the
    layout of version 1's ERROR), which names both versions, so the old edge can say why it stops; the
    cloud keeps serving version-2 edges."""
    import json

    h = harness()
    raw: list = []
    h.server.ep.send = lambda frames, identity=None: raw.append([bytes(f) for f in frames]) or 0
    v1_hello = b"SPLE\x01\x01" + json.dumps({
        "client_id": 0, "num_clients": 1, "model": "resnet18", "cut": 3, "activation_shape": list(ACT),
        "input_shape": [1, 28, 28], "num_classes": 10, "samples": 100, "resume_step": 0, "planned_steps": 10}).encode()
    h.server._dispatch(b"edge-v1", [v1_hello])
    assert len(raw) == 1 and raw[0][0][:6] == b"SPLE\x01\x09", raw  # version 1, ERROR
    header = json.loads(raw[0][0][6:])
    assert header["code"] == "unsupported_version" and "protocol version 2" in header["message"] \
        and "version 1" in header["message"], header
    assert 0 not in h.server.by_client, "no session for a message the cloud could not read"
    with pytest.raises(P.VersionError):  # a version-2 reader refuses that frame: it is not version 2
        P.unpack(raw[0])
    h.server.ep.send = lambda frames, identity=None: h.replies.append((identity, P.unpack([bytes(f) for f in frames]))) or 0
    assert h.hello(b"edge-v2", 0).type == P.MsgType.WELCOME


def test_a_retried_step_is_answered_from_cache_under_the_retry_s_id(harness):
    """The cloud applies a step once; a retry of it gets the cached GRAD, named as the answer to the
    retry (a new request id after a new HELLO), not to the request that first carried the step."""
    h = harness()
    assert h.hello(b"edge", 0).type == P.MsgType.WELCOME
    first = h.train(b"edge", 1)
    again = h.train(b"edge", 1)  # ask() checks reply_to == this request's id
    assert first.type == again.type == P.MsgType.GRAD and first.header["reply_to"] != again.header["reply_to"]
    assert {k: v for k, v in first.header.items() if k != "reply_to"} == \
        {k: v for k, v in again.header.items() if k != "reply_to"}
    assert h.server.server_step == 1, "applied once"


def test_a_session_that_is_not_active_is_never_served(harness):
    """D5: --max-clients was checked only at HELLO. A client that said BYE kept getting TRAIN and EVAL
    served, and a timed-out client that came back was served beside the clients that took its place.
    Now each request of a closed session gets unknown_client (say HELLO again), and that HELLO meets
    the limit."""
    h = harness(max_clients=1)
    done, late, other = b"edge-done", b"edge-late", b"edge-other"
    assert h.hello(done, 0).type == P.MsgType.WELCOME
    assert h.train(done, 1).type == P.MsgType.GRAD
    assert h.ask(done, P.MsgType.BYE, {"reason": "finished", "steps": 1}).type == P.MsgType.BYE_ACK
    assert h.ask(done, P.MsgType.BYE, {"reason": "finished", "steps": 1}).type == P.MsgType.BYE_ACK, \
        "a retried BYE (its BYE_ACK lost) is acknowledged again"
    for reply in (h.train(done, 2), h.eval(done)):
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.UNKNOWN_CLIENT, reply.header
        assert "said BYE" in reply.header["message"]
    assert h.hello(late, 1).type == P.MsgType.WELCOME
    h.server.by_client[1].last_seen -= 3600
    h.server._housekeeping()  # client 1 is timed out: its place is free
    assert h.hello(other, 2).type == P.MsgType.WELCOME
    for reply in (h.train(late, 1), h.eval(late)):
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.UNKNOWN_CLIENT, reply.header
        assert "timed out" in reply.header["message"]
    reply = h.hello(late, 1)
    assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.SERVER_FULL
    assert sum(s.active for s in h.server.by_client.values()) == 1
    assert h.server.by_client[1].last_step == 0, "nothing of the closed session's was applied"


@pytest.mark.parametrize("over,needle", [
    ({"num_clients": -1}, "num_clients"), ({"num_clients": 0}, "num_clients"),
    ({"planned_steps": -5}, "planned_steps"), ({"planned_steps": 0}, "planned_steps"),
    ({"planned_steps": 2**53 - 1}, "planned_steps"), ({"resume_step": -1}, "resume_step"),
    ({"samples": -1}, "samples"), ({"client_id": 4}, "client_id"), ({"fresh": "yes"}, "fresh"),
    ({"client_files": ["x"]}, "client_files"),
])
def test_every_hello_field_is_validated(harness, over, needle):
    h = harness()
    reply = h.hello(b"edge", 0 if "client_id" not in over else over.pop("client_id"), **over)
    assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.BAD_MESSAGE, reply.header
    assert needle in reply.header["message"]
    assert not h.server.by_client, "no session made"


def test_a_step_beyond_the_clients_plan_is_refused(harness):
    """A TRAIN whose step jumped to 2**53 - 2 was applied, after which that client could never step
    again; steps are now bounded by the HELLO's planned_steps (a jump within it stays possible: an
    edge whose checkpoint is ahead of a restarted cloud's)."""
    h = harness()
    assert h.hello(b"edge", 0, planned_steps=10).type == P.MsgType.WELCOME
    for step in (2**53 - 2, 11):
        reply = h.train(b"edge", step)
        assert reply.type == P.MsgType.ERROR and "beyond this client's plan of 10 steps" in reply.header["message"]
    assert h.server.by_client[0].last_step == 0 and h.server.server_step == 0
    assert h.train(b"edge", 10).type == P.MsgType.GRAD


def test_welcome_spells_out_both_codec_specs_and_a_payload_of_another_codec_is_refused(harness):
    """WELCOME's codec and grad_codec are CodecSpec JSON with every setting; the gradient codec
    defaults to the activation codec. The session's codec decodes: a valid payload of another
    codec is answered with bad_payload (the server goes on), on TRAIN and on EVAL alike."""
    h = harness()
    w = h.hello(b"edge", 0)
    assert w.type == P.MsgType.WELCOME
    assert sc.CodecSpec.from_json(w.header["codec"]) == sc.CodecSpec("uq", {"bits": 4, "grid": "zero"})
    assert w.header["grad_codec"] == w.header["codec"]
    h2 = harness(grad_codec=sc.CodecSpec("fp16"))
    assert h2.hello(b"edge", 0).header["grad_codec"] == {"name": "fp16", "params": {}}
    x = np.zeros((2, *ACT), np.float32)
    for header, type_ in (({"step": 1, "n": 2, "round": 1, "total_rounds": 10, "encode_ms": 0.0}, P.MsgType.TRAIN),
                          ({"eval_id": 1, "n": 2, "has_labels": False}, P.MsgType.EVAL)):
        frames = [sc.get("fp32").encode(x)] + ([np.arange(2, dtype="<i8").tobytes()] if type_ == P.MsgType.TRAIN else [])
        reply = h.ask(b"edge", type_, header, frames)
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.BAD_PAYLOAD, reply.header
        assert "a fp32 payload" in reply.header["message"] and "codec is uq" in reply.header["message"]
    assert h.train(b"edge", 1).type == P.MsgType.GRAD, "the same session goes on with its own codec"
