"""CurveZMQ encryption and ZAP authentication between cloud-serve and edge-train."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from splitedge import codecs as sc
from splitedge.lab import launch
from splitedge.wire import protocol as P
from splitedge.wire import security

from helpers import bin_path

SYNTH = "synthetic:n=512,classes=10,shape=1x28x28,seed=0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    security.generate(d, clients=3)
    # client-1 exists but is not authorized: its public key is moved out of the cloud's list (0 and 2 are)
    (d / "authorized_clients" / "client-1.key").rename(d / "client-1.key.unlisted")
    return d


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def test_keys_generate_layout_and_permissions(tmp_path):
    res = subprocess.run([bin_path("splitedge"), "keys", "generate", str(tmp_path / "k"), "--clients", "3"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    k = tmp_path / "k"
    assert (k / "server.key").is_file() and (k / "server.key_secret").is_file()
    assert sorted(p.name for p in (k / "clients").iterdir()) == [f"client-{i}.key_secret" for i in range(3)]
    assert sorted(p.name for p in (k / "authorized_clients").iterdir()) == [f"client-{i}.key" for i in range(3)]
    for p in [k / "server.key_secret", *(k / "clients").iterdir()]:
        assert p.stat().st_mode & 0o077 == 0, f"{p} is readable by others"
    pub, sec = security.load_keypair(k / "clients" / "client-0.key_secret")
    assert len(pub) == len(sec) == 40
    res = subprocess.run([bin_path("splitedge"), "keys", "generate", str(k)], capture_output=True, text=True)
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr
    with pytest.raises(security.KeyFileError, match="no secret key"):
        security.load_keypair(k / "server.key")


def test_loopback_detection():
    assert security.is_loopback_endpoint("tcp://127.0.0.1:5555")
    assert security.is_loopback_endpoint("tcp://localhost:5555")
    assert security.is_loopback_endpoint("tcp://[::1]:5555")
    assert security.is_loopback_endpoint("ipc:///tmp/x")
    assert not security.is_loopback_endpoint("tcp://0.0.0.0:5555")
    assert not security.is_loopback_endpoint("tcp://*:5555")
    assert not security.is_loopback_endpoint("tcp://10.1.2.3:5555")
    assert not security.is_loopback_endpoint("tcp://eth0:5555")


def _cloud(art, port, workdir, *extra):
    cmd = launch.script("cloud-serve") + ["--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{port}", "--codec",
                                          "fp32", "--threads", "1", "--metrics", str(workdir / "m.jsonl"), *extra]
    return subprocess.Popen(cmd, stdout=open(workdir / "cloud.log", "a"), stderr=subprocess.STDOUT)


def _curve_args(keys):
    return ["--curve-secret", str(keys / "server.key_secret"), "--authorized-clients", str(keys / "authorized_clients")]


def _edge(art, port, workdir, *extra, name="edge"):
    cmd = launch.script("edge-train") + ["--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{port}", "--data",
                                         SYNTH, "--steps", "5", "--batch-size", "16", "--eval-samples", "32",
                                         "--threads", "1", "--no-progress", "--summary", str(workdir / f"{name}.json"),
                                         *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_a_listed_key_trains_and_an_unlisted_key_is_refused(art, keys, tmp_path):
    port = launch.free_port()
    cloud = _cloud(art, port, tmp_path, *_curve_args(keys))
    try:
        ok = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-0.key_secret"),
                   "--server-key", str(keys / "server.key"), name="listed")
        assert ok.returncode == 0, ok.stderr
        assert json.loads((tmp_path / "listed.json").read_text())["steps"] == 5

        bad = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-1.key_secret"),
                    "--server-key", str(keys / "server.key"), "--give-up", "60", "--timeout", "5", name="unlisted")
        assert bad.returncode == 1
        assert "refused this edge's CurveZMQ key" in bad.stderr
        # reported from the failed handshake, not after unanswered requests (those log "retrying")
        assert "retrying" not in bad.stderr, bad.stderr

        plain = _edge(art, port, tmp_path, "--give-up", "5", "--timeout", "1", name="plain")
        assert plain.returncode == 1 and "disagree on encryption" in plain.stderr

        # a listed edge key with another cloud's public key: the message points at --server-key
        other = security.generate(tmp_path / "other-keys", 1)
        wrong = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-0.key_secret"),
                      "--server-key", str(other["server"][0]), "--give-up", "10", "--timeout", "2", name="wrong")
        assert wrong.returncode == 1 and "is --server-key" in wrong.stderr, wrong.stderr
        steps = [e for e in launch.read_jsonl(tmp_path / "m.jsonl") if e["event"] == "step"]
        assert len(steps) == 5, "only the listed edge's steps reached the server"
        assert cloud.poll() is None, "the cloud must survive refused peers"
    finally:
        cloud.terminate()
        cloud.wait(timeout=30)


class Relay:
    """A TCP relay on loopback that records every byte crossing it, in both directions."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.captured = bytearray()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.listener.settimeout(0.2)
        conns = []
        while not self._stop:
            try:
                a, _ = self.listener.accept()
                conns.append((a, self._connect()))
            except TimeoutError:
                pass
            for a, b in list(conns):
                while True:
                    r, _, _ = select.select([a, b], [], [], 0.01)
                    if not r:
                        break
                    for s in r:
                        data = s.recv(1 << 16)
                        if not data:
                            conns.remove((a, b))
                            break
                        self.captured += data
                        (b if s is a else a).sendall(data)
                    else:
                        continue
                    break

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 60  # the cloud may still be starting (imports torch)
        while True:
            try:
                return socket.create_connection(("127.0.0.1", self.target))
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self):
        self._stop = True
        self._thread.join(timeout=5)
        self.listener.close()


def _send_known_activation(port: int, curve: security.CurveClient | None) -> bytes:
    """HELLO + one TRAIN with an fp32 activation of known bytes; returns that payload."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 60000)
    if curve is not None:
        security.apply_client(s, curve)
    s.connect(f"tcp://127.0.0.1:{port}")
    try:
        s.send_multipart(P.pack(P.MsgType.HELLO, {"id": 1,
            "client_id": 0, "num_clients": 1, "model": "resnet18", "cut": 3, "activation_shape": [64, 14, 14],
            "input_shape": [1, 28, 28], "num_classes": 10, "samples": 4, "resume_step": 0, "planned_steps": 1}))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.WELCOME
        act = np.random.default_rng(7).random((2, 64, 14, 14), dtype=np.float32) + 1.0
        payload = sc.get("fp32").encode(act)
        s.send_multipart(P.pack(P.MsgType.TRAIN, {"id": 2, "step": 1, "n": 2, "round": 1, "total_rounds": 1, "encode_ms": 0},
                                [payload, np.array([1, 2], np.int64).tobytes()]))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.GRAD
        return payload
    finally:
        s.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_captured_traffic_contains_raw_activations_only_without_curve(art, keys, tmp_path, encrypted):
    """Bytes captured on the loopback port: the activation's raw float32 bytes are there in plain TCP
    (so the check can fail) and nowhere with CURVE on."""
    port = launch.free_port()
    cloud = _cloud(art, port, tmp_path, *(_curve_args(keys) if encrypted else []))
    relay = Relay(port)
    try:
        curve = security.client_config(keys / "clients" / "client-0.key_secret", keys / "server.key") \
            if encrypted else None
        payload = _send_known_activation(relay.port, curve)
        time.sleep(0.3)
    finally:
        relay.close()
        cloud.terminate()
        cloud.wait(timeout=30)
    captured = bytes(relay.captured)
    assert len(captured) > len(payload), "the capture saw the traffic"
    windows = [payload[i:i + 64] for i in range(1000, len(payload) - 64, 20000)]
    found = [w in captured for w in windows]
    markers = [m in captured for m in (P.MAGIC, b"SPEC", b"resnet18")]
    if encrypted:
        assert not any(found) and not any(markers)
    else:
        assert all(found) and all(markers)


def _dealer(port: int, keys, client: int, identity: bytes) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 60000)
    s.setsockopt(zmq.IDENTITY, identity)
    security.apply_client(s, security.client_config(keys / "clients" / f"client-{client}.key_secret",
                                                    keys / "server.key"))
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _hello(s: zmq.Socket, client_id: int) -> P.Message:
    s.send_multipart(P.pack(P.MsgType.HELLO, {"id": 1,
        "client_id": client_id, "num_clients": 2, "model": "resnet18", "cut": 3, "activation_shape": [64, 14, 14],
        "input_shape": [1, 28, 28], "num_classes": 10, "samples": 4, "resume_step": 0, "planned_steps": 1}))
    return P.unpack(s.recv_multipart())


def test_client_ids_are_bound_to_keys(art, keys, tmp_path):
    """With CURVE, the first key to say HELLO as a client id owns it for the run: another listed key can
    neither take that id (nor its session through the same routing identity), and gets a clear refusal;
    the owner keeps training."""
    port = launch.free_port()
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "1"]
    cloud = _cloud(art, port, tmp_path, *_curve_args(keys), *ckpt)
    socks = []
    try:
        owner = _dealer(port, keys, 0, b"shared-identity")
        socks.append(owner)
        assert _hello(owner, 0).type == P.MsgType.WELCOME
        assert _hello(owner, 0).type == P.MsgType.WELCOME, "the owner may say HELLO again (reconnects)"
        owner.close()
        time.sleep(0.5)  # the routing identity is free again

        thief = _dealer(port, keys, 2, b"shared-identity")
        socks.append(thief)
        thief.send_multipart(P.pack(P.MsgType.PING, {"id": 1, "t": 1.0}))
        reply = P.unpack(thief.recv_multipart())
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.CLIENT_ID_TAKEN
        reply = _hello(thief, 1)
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.CLIENT_ID_TAKEN, \
            "not even a HELLO for a free id goes through another key's session"

        other = _dealer(port, keys, 2, b"own-identity")
        socks.append(other)
        reply = _hello(other, 0)
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.CLIENT_ID_TAKEN
        assert "belongs to another edge" in reply.header["message"]
        assert _hello(other, 1).type == P.MsgType.WELCOME, "a free id is bound to the new key"

        # the real edges: the owner of id 0 trains; client-2's key cannot train as id 0 but can as id 1
        ok = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-0.key_secret"),
                   "--server-key", str(keys / "server.key"), "--num-clients", "2", name="owner")
        assert ok.returncode == 0, ok.stderr
        bad = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-2.key_secret"),
                    "--server-key", str(keys / "server.key"), "--num-clients", "2", name="taken")
        assert bad.returncode == 1 and "client_id_taken" in bad.stderr, bad.stderr
        mine = _edge(art, port, tmp_path, "--curve-secret", str(keys / "clients" / "client-2.key_secret"),
                     "--server-key", str(keys / "server.key"), "--num-clients", "2", "--client-id", "1", name="mine")
        assert mine.returncode == 0, mine.stderr
        steps = [e for e in launch.read_jsonl(tmp_path / "m.jsonl") if e["event"] == "step"]
        assert sorted((e["client"], e["step"]) for e in steps) == [(c, i) for c in (0, 1) for i in range(1, 6)]
        assert cloud.poll() is None

        # the binding survives a restart from the checkpoint
        cloud.terminate()
        assert cloud.wait(timeout=60) == 0
        cloud = _cloud(art, port, tmp_path, *_curve_args(keys), *ckpt, "--resume")
        late = _dealer(port, keys, 2, b"after-restart")
        socks.append(late)
        reply = _hello(late, 0)
        assert reply.type == P.MsgType.ERROR and reply.header["code"] == P.ErrorCode.CLIENT_ID_TAKEN
        assert _hello(late, 1).type == P.MsgType.WELCOME
    finally:
        for s in socks:
            s.close()
        cloud.terminate()
        cloud.wait(timeout=30)


def test_binding_beyond_loopback_without_keys_warns(art, tmp_path):
    port = launch.free_port()
    cmd = launch.script("cloud-serve") + ["--artifacts", str(art), "--bind", f"tcp://0.0.0.0:{port}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        out = ""
        while time.monotonic() < deadline and "serving" not in out:
            out += p.stdout.readline()
        assert "WITHOUT encryption or authentication" in out
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_mismatched_curve_options_exit_2(art, keys):
    res = subprocess.run(launch.script("cloud-serve") + ["--artifacts", str(art), "--curve-secret",
                                                         str(keys / "server.key_secret")], capture_output=True, text=True)
    assert res.returncode == 2 and "go together" in res.stderr
    res = subprocess.run(launch.script("cloud-serve") + ["--artifacts", str(art), "--curve-secret", str(keys / "server.key"),
                                                         "--authorized-clients", str(keys / "authorized_clients")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no secret key" in res.stderr


# ---------------------------------------------------------------------------- hostile local files
# Every file the cloud or the edge reads is checked before use: a file with deep nesting, fields of
# the wrong type or out of range, or non-finite weights is refused with a message naming it (the
# commands exit 2), never a RecursionError, a ValueError after joining the cloud, or NaN training.

DEEP = "[" * 50_000 + "]" * 50_000


def _manifest_case(art: Path, dst: Path, case: str) -> Path:
    import shutil

    shutil.copytree(art, dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    if case == "deep nesting":
        text = json.dumps(m)[:-1] + ', "extra": ' + DEEP + "}"
        path.write_text(text)
        return dst
    edits = {
        "cut of the wrong type": ("cut", "3"),
        "input_shape of the wrong type": ("input_shape", "1x28x28"),
        "files of the wrong type": ("files", ["client/checkpoint"]),
        "negative num_classes": ("num_classes", -1),
        "a zero dimension": ("activation_shape", [64, 0, 14]),
        "a huge dimension": ("input_shape", [1, 2**40, 28]),
        "a negative learning rate": ("optimizer", {**m["optimizer"], "lr": -1}),
        "a path outside the artifacts": ("files", {**m["files"], "../../etc/passwd": "0" * 64}),
    }
    key, value = edits[case]
    m[key] = value
    path.write_text(json.dumps(m))
    return dst


MANIFEST_CASES = ["deep nesting", "cut of the wrong type", "input_shape of the wrong type", "files of the wrong type",
                  "negative num_classes", "a zero dimension", "a huge dimension", "a negative learning rate",
                  "a path outside the artifacts"]


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_hostile_manifest_is_refused_naming_it(art, tmp_path, case):
    from splitedge.export import manifest as mf

    bad = _manifest_case(art, tmp_path / "art", case)
    with pytest.raises(mf.ManifestError, match="manifest.json"):
        mf.load(bad, verify=False)


def test_a_deeply_nested_manifest_makes_both_commands_exit_2(art, tmp_path):
    bad = _manifest_case(art, tmp_path / "art", "deep nesting")
    for argv in (["cloud-serve", "--artifacts", str(bad), "--bind", f"tcp://127.0.0.1:{launch.free_port()}"],
                 ["edge-train", "--artifacts", str(bad), "--data", SYNTH, "--steps", "1",
                  "--connect", f"tcp://127.0.0.1:{launch.free_port()}", "--give-up", "1"]):
        res = subprocess.run(launch.script(argv[0]) + argv[1:], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert str(bad / "manifest.json") in res.stderr and "nested more than" in res.stderr, res.stderr[-2000:]


SERVER_STATE = {"format_version": 1, "server_step": 7, "model": "resnet18", "cut": 3,
                "clients": {"0": {"last_step": 7, "done": False}}}
SERVER_STATE_CASES = {
    "deep nesting": '{"server_step": 7, "model": "resnet18", "cut": 3, "clients": {"0": ' + DEEP + "}}",
    "no format_version": {k: v for k, v in SERVER_STATE.items() if k != "format_version"},
    "NaN": json.dumps(SERVER_STATE).replace('"server_step": 7', '"server_step": NaN'),
    "server_step as a string": {**SERVER_STATE, "server_step": "7"},
    "clients as a list": {**SERVER_STATE, "clients": [7]},
    "done as a string": {**SERVER_STATE, "clients": {"0": {"last_step": 7, "done": "no"}}},
    "negative server_step": {**SERVER_STATE, "server_step": -1},
    "negative last_step": {**SERVER_STATE, "clients": {"0": {"last_step": -5}}},
    "a last_step of 2**70": {**SERVER_STATE, "clients": {"0": {"last_step": 2**70}}},
    "a client id that is no integer": {**SERVER_STATE, "clients": {"1e3": {"last_step": 1}}},
    "a negative client id": {**SERVER_STATE, "clients": {"-1": {"last_step": 1}}},
}


@pytest.mark.parametrize("case", list(SERVER_STATE_CASES))
def test_a_hostile_server_state_is_refused_naming_it(tmp_path, case):
    from splitedge.runtime_cloud.state import _read_server_state
    from splitedge.runtime_cloud.trainer import CorruptFile

    content = SERVER_STATE_CASES[case]
    path = tmp_path / "server_state.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CorruptFile) as e:
        _read_server_state(path)
    assert str(path) in str(e.value)
    assert _read_server_state(_write(tmp_path / "ok.json", SERVER_STATE))[0] == 7, "the valid one still reads"


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def server_ckpt(art, tmp_path_factory):
    """A real checkpoint of the server model (SGD with momentum: it has optimizer state)."""
    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import ServerModel

    model = ServerModel(art, mf.load(art), optimizer="sgd", lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    model.train_step(rng.standard_normal((4, 64, 14, 14)).astype(np.float32), np.array([0, 1, 2, 3]))
    d = tmp_path_factory.mktemp("server-ckpt")
    model.save(d)
    return d


def _nan_safetensors(path: Path) -> None:
    """The same tensors, the first floating one poisoned with NaN."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    name = next(k for k, v in t.items() if v.is_floating_point())
    t[name] = t[name].clone()
    t[name].view(-1)[0] = float("nan")
    save_file(t, str(path))


OPTIMIZER_CASES = ["deep nesting", "an lr of NaN", "a negative lr", "a momentum of 5", "steps as a string",
                   "NaN in server_model.safetensors", "Inf in server_optimizer.safetensors"]


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_a_hostile_server_checkpoint_is_refused_naming_the_file(art, server_ckpt, tmp_path, case):
    import shutil

    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import CorruptFile, ServerModel

    d = tmp_path / "ckpt"
    shutil.copytree(server_ckpt, d)
    meta_path = d / "server_optimizer.json"
    meta = json.loads(meta_path.read_text())
    target = meta_path
    if case == "deep nesting":
        meta_path.write_text(json.dumps(meta)[:-1] + ', "x": ' + DEEP + "}")
    elif case == "an lr of NaN":
        meta_path.write_text(json.dumps(meta).replace('"lr": 0.01', '"lr": NaN'))
    elif case == "a negative lr":
        meta["param_groups"][0]["lr"] = -1.0
        _write(meta_path, meta)
    elif case == "a momentum of 5":
        meta["param_groups"][0]["momentum"] = 5
        _write(meta_path, meta)
    elif case == "steps as a string":
        meta["steps"] = "many"
        _write(meta_path, meta)
    elif case.startswith("NaN"):
        target = d / "server_model.safetensors"
        _nan_safetensors(target)
    else:
        target = d / "server_optimizer.safetensors"
        from safetensors.torch import load_file, save_file

        t = load_file(str(target))
        name = next(iter(t))
        t[name] = t[name].clone().fill_(float("inf"))
        save_file(t, str(target))
    model = ServerModel(art, mf.load(art), optimizer="sgd", lr=0.01, momentum=0.9)
    with pytest.raises(CorruptFile) as e:
        model.load(d)
    assert str(target) in str(e.value), str(e.value)


def test_non_finite_or_unlisted_server_weights_in_the_artifacts_are_refused(art, tmp_path):
    """D6: the cloud used to load server/model.safetensors with no sha256 in the manifest, and NaN
    weights whose sha256 matched."""
    import hashlib
    import shutil

    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import CorruptFile, ServerModel

    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["files"]["server/model.safetensors"]
    _write(bad / "manifest.json", m)
    with pytest.raises(CorruptFile, match="lists no sha256 for server/model.safetensors"):
        ServerModel(bad, mf.load(bad))
    w = bad / "server" / "model.safetensors"
    _nan_safetensors(w)
    m["files"]["server/model.safetensors"] = hashlib.sha256(w.read_bytes()).hexdigest()
    _write(bad / "manifest.json", m)
    with pytest.raises(CorruptFile, match="holds NaN or Inf") as e:
        ServerModel(bad, mf.load(bad))
    assert str(w) in str(e.value)


RUN = {"model": "resnet18", "cut": 3, "artifacts": "a" * 32, "client_id": 0, "batch_size": 16, "data": "x",
       "partition": "iid", "seed": 0, "num_clients": 1, "partition_plan": "p"}
PROGRESS = {"step": 4, "epoch": 0, "batch": 4, "bytes_sent": 10, "bytes_received": 10, "samples": 64, "evals": [],
            "run": RUN}
PROGRESS_CASES = {
    "deep nesting": '{"step": 4, "evals": ' + DEEP + "}",
    "step as a string": {**PROGRESS, "step": "4"},
    "step as a float": {**PROGRESS, "step": 4.5},
    "evals as a string": {**PROGRESS, "evals": "none"},
    "run as a list": {**PROGRESS, "run": [1]},
    "no run": {k: v for k, v in PROGRESS.items() if k != "run"},
    "a run without its shard plan": {**PROGRESS, "run": {k: v for k, v in RUN.items() if k != "partition_plan"}},
    "a negative step": {**PROGRESS, "step": -3},
    "a step of 2**70": {**PROGRESS, "step": 2**70},
    "a negative byte count": {**PROGRESS, "bytes_sent": -1},
    "Infinity": json.dumps(PROGRESS).replace('"samples": 64', '"samples": Infinity'),
}


@pytest.mark.parametrize("case", list(PROGRESS_CASES))
def test_a_hostile_edge_progress_file_is_refused_naming_it(tmp_path, case):
    from splitedge.runtime_edge.errors import EdgeInputError
    from splitedge.runtime_edge.resume import load_progress as _load_progress

    content = PROGRESS_CASES[case]
    path = tmp_path / "edge_progress.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(EdgeInputError) as e:
        _load_progress(path)
    assert str(path) in str(e.value)
    assert _load_progress(_write(tmp_path / "ok.json", PROGRESS))[0].step == 4, "the valid one still reads"


def test_a_resumed_edge_checkpoint_with_nan_weights_or_an_impossible_position_exits_2(art, tmp_path):
    """The ORT checkpoint of a diverged run (NaN weights), and a progress file whose batch lies beyond
    the epoch (the batch stream would yield nothing, forever): refused at start, exit 2."""
    from helpers import edge_run_identity

    from splitedge.fsutil import CheckpointDir
    from splitedge.runtime_edge.ort_backend import EdgeModel

    model = EdgeModel(art)
    params = model.get_parameters()
    name = sorted(params)[0]
    model.set_parameters({name: np.full_like(params[name], np.nan)})
    run = edge_run_identity(art, SYNTH, 16)
    cases = {"nan": ({"step": 2, "epoch": 0, "batch": 2, "run": run}, True, "holds NaN or Inf"),
             "position": ({"step": 2, "epoch": 0, "batch": 999, "run": run}, False, "batch 999 is beyond")}
    for case, (progress, poisoned, needle) in cases.items():
        root = tmp_path / case

        def write(d: Path, progress=progress, poisoned=poisoned) -> None:
            (EdgeModel(art) if not poisoned else model).save_checkpoint(d / "edge_checkpoint")
            (d / "edge_progress.json").write_text(json.dumps(progress))

        CheckpointDir(root).write(f"{progress['step']:09d}", write)
        res = subprocess.run(launch.script("edge-train") + [
            "--artifacts", str(art), "--data", SYNTH, "--batch-size", "16", "--checkpoint-dir", str(root), "--resume",
            "--steps", "4", "--connect", f"tcp://127.0.0.1:{launch.free_port()}", "--give-up", "1"],
            capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_a_deeply_nested_file_at_the_summary_path_is_kept(tmp_path):
    from splitedge.runtime_edge.errors import EdgeInputError
    from splitedge.runtime_edge.prepare import check_summary_target as _check_summary_target

    path = tmp_path / "s.json"
    path.write_text(DEEP)
    with pytest.raises(EdgeInputError, match="is not an edge-train summary"):
        _check_summary_target(path)
    assert path.read_text() == DEEP


def test_a_deeply_nested_profile_is_refused_naming_it(tmp_path):
    """edge-train --profile reads a TOML file: deep nesting was a RecursionError traceback."""
    from splitedge.profiles.schema import ProfileError, load

    path = tmp_path / "deep.toml"
    path.write_text('name = "x"\nbad = ' + "[" * 3000 + "1" + "]" * 3000 + "\n")
    with pytest.raises(ProfileError, match="nested too deeply") as e:
        load(path)
    assert str(path) in str(e.value)
