"""CurveZMQ encryption and ZAP authentication between cloud-serve and edge-train."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from splitedge import codecs as sc
from splitedge import launch
from splitedge import protocol as P
from splitedge import security

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
            except socket.timeout:
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
        s.send_multipart(P.pack(P.MsgType.HELLO, {
            "client_id": 0, "num_clients": 1, "model": "resnet18", "cut": 3, "activation_shape": [64, 14, 14],
            "input_shape": [1, 28, 28], "num_classes": 10, "samples": 4, "resume_step": 0, "planned_steps": 1}))
        assert P.unpack(s.recv_multipart()).type == P.MsgType.WELCOME
        act = np.random.default_rng(7).random((2, 64, 14, 14), dtype=np.float32) + 1.0
        payload = sc.get("fp32").encode(act)
        s.send_multipart(P.pack(P.MsgType.TRAIN, {"step": 1, "n": 2, "round": 1, "total_rounds": 1, "encode_ms": 0},
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
    s.send_multipart(P.pack(P.MsgType.HELLO, {
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
        thief.send_multipart(P.pack(P.MsgType.PING, {"t": 1.0}))
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
