"""edge-train against a cloud that misbehaves: a scripted ROUTER stands in for cloud-serve.

SECURITY.md says the edge checks the structure of what it receives (schema, codec settings,
gradient shapes, payload integrity, message size). Each case here makes one of those checks
fire: the edge must stop with exit code 1 and a message naming the problem -- no traceback, no
training on what it was sent.
"""

from __future__ import annotations

import struct
import subprocess
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import zmq

from splitedge import codecs as sc
from splitedge.lab import launch
from splitedge.wire import protocol as P

SYNTH = "synthetic:n=256,classes=10,shape=1x28x28,seed=0"
BATCH = 16


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


def _welcome(**over) -> dict:
    fp32 = {"name": "fp32", "params": {}}
    return {"session": "fake", "codec": fp32, "grad_codec": fp32, "fedavg_every": 0, "last_step": 0,
            "server_step": 0, **over}


class FakeCloud:
    """Answers HELLO with ``welcome`` and every TRAIN with ``on_train(header) -> frames``; PING with PONG."""

    def __init__(self, welcome: dict, on_train, on_hello=None):
        self.on_hello = on_hello  # header -> frames, instead of the WELCOME
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.welcome, self.on_train = welcome, on_train
        self.trains = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            msg = P.unpack(frames)
            if msg.type == P.MsgType.HELLO:
                out = self.on_hello(msg.header) if self.on_hello else \
                    P.pack(P.MsgType.WELCOME, {"reply_to": msg.header["id"], **self.welcome})
            elif msg.type == P.MsgType.TRAIN:
                self.trains += 1
                out = self.on_train(msg.header)
            elif msg.type == P.MsgType.PING:
                out = P.pack_message(P.pong(msg.header["id"], t=msg.header["t"]))
            elif msg.type == P.MsgType.BYE:
                out = P.pack_message(P.bye_ack(msg.header["id"]))
            else:
                continue
            self.sock.send_multipart([ident, *out])

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _grad(header: dict, payload: bytes, **over) -> list:
    h = {"reply_to": header["id"], "step": header["step"], "loss": 1.0, "correct": 0, "fedavg_round": None, "timings": {}, **over}
    return P.pack(P.MsgType.GRAD, h, [payload])


def _edge_cmd(art: Path, port: int, tmp_path: Path, *extra: str) -> list[str]:
    return launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{port}", "--data", SYNTH, "--steps", "2",
        "--batch-size", str(BATCH), "--eval-samples", "16", "--threads", "1", "--no-progress",
        "--timeout", "1", "--give-up", "6", "--summary", str(tmp_path / "s.json"), *extra,
    ]


def _edge(art: Path, port: int, tmp_path: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(_edge_cmd(art, port, tmp_path, *extra), capture_output=True, text=True, timeout=timeout)


def _run(art, tmp_path, welcome, on_train) -> tuple[subprocess.CompletedProcess, int]:
    cloud = FakeCloud(welcome, on_train)
    try:
        res = _edge(art, cloud.port, tmp_path)
    finally:
        cloud.close()
    return res, cloud.trains


def _act_shape():
    return (BATCH, 64, 14, 14)


CASES = {
    "a codec the edge does not know": (
        _welcome(codec={"name": "rot13", "params": {}}), None, "codec settings this edge cannot use"),
    "codec parameters out of range": (
        _welcome(codec={"name": "uq", "params": {"bits": 99}}), None, "codec settings this edge cannot use"),
    "a gradient of the wrong shape": (
        _welcome(), lambda h: _grad(h, sc.get("fp32").encode(np.zeros((BATCH, 64, 7, 7), np.float32))),
        "gradient of shape"),
    "a gradient payload that does not decode": (
        _welcome(), lambda h: _grad(h, b"SPLC" + b"\0" * 60), "does not decode: bad magic"),
    "a gradient with NaN": (
        _welcome(), lambda h: _grad(h, _fp32_nan()), "NaN"),
    "a GRAD header without its fields": (
        _welcome(), lambda h: P.pack(P.MsgType.GRAD, {"reply_to": h["id"], "step": h["step"]}, [b"x"]),
        "malformed message(s); the last: GRAD"),
    "a gradient larger than the edge accepts": (
        _welcome(), lambda h: _grad(h, b"\0" * (8 << 20)), "did not answer TRAIN"),
}


def _fp32_nan() -> bytes:
    """A valid fp32 payload (CRC included) whose last value is NaN: the codec refuses to encode one."""
    blob = bytearray(sc.get("fp32").encode(np.zeros(_act_shape(), np.float32)))
    blob[-8:-4] = np.float32(np.nan).tobytes()  # the values end just before the 4-byte CRC
    body = bytes(blob[:-4])
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@pytest.mark.parametrize("case", list(CASES))
def test_edge_stops_cleanly_on_what_a_hostile_cloud_sends(art, tmp_path, case):
    welcome, on_train, needle = CASES[case]
    res, trains = _run(art, tmp_path, welcome, on_train or (lambda h: _grad(h, b"")))
    assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert needle in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "s.json").exists(), "no summary: the run did not complete"
    if on_train is None:
        assert trains == 0, "a WELCOME with unusable settings: the edge never trains"


# ---------------------------------------------------------------------------- answers that allow no progress


def _error(code: str, request: dict, **extra) -> list:
    """An ERROR answering ``request`` (its header)."""
    return P.pack_message(P.error(request["id"], code=code, message=f"scripted {code}", **extra))


NO_PROGRESS = {
    "unknown_client to every TRAIN": (None, lambda h: _error("unknown_client", h, step=h["step"]), ()),
    "stale_step naming the same step": (
        None, lambda h: _error("stale_step", h, step=h["step"], expected_step=h["step"]), ()),
    "server_full to every HELLO": (lambda h: _error("server_full", h), None, ()),
    "a 1 bit/s emulated link": (None, None, ("--bandwidth", "1bit")),
}


@pytest.mark.parametrize("case", list(NO_PROGRESS))
def test_give_up_bounds_every_retry_loop(art, tmp_path, case):
    """D2/D3: a cloud that answers every TRAIN with unknown_client (the edge says HELLO again) or with a
    stale_step naming the same step kept the edge sending thousands of messages a second, forever; at
    1 bit/s the edge slept through --give-up in one emulated send. Now each ends with exit 1 and a
    message once --give-up (4 s here) has passed without progress, having asked with backoff."""
    on_hello, on_train, extra = NO_PROGRESS[case]
    cloud = FakeCloud(_welcome(), on_train or (lambda h: _grad(h, b"")), on_hello=on_hello)
    try:
        res = _edge(art, cloud.port, tmp_path, "--give-up", "4", *extra, timeout=90)
    finally:
        cloud.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "--give-up 4s" in res.stderr, res.stderr[-3000:]
    assert cloud.trains < 20, f"{cloud.trains} TRAIN messages: no backoff"


def _until_line(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Reads proc's stderr lines until one matches ``pattern``; the lines read."""
    import re
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sel.select(timeout=0.5):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if re.search(pattern, line):
                return lines
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {''.join(lines)[-3000:]}")


@pytest.mark.parametrize("case", ["a 100 bit/s emulated link", "waiting for a place on a full cloud"])
def test_sigterm_stops_the_edge_within_seconds(art, tmp_path, case):
    """D3: SIGTERM used to wait for the end of an emulated send (a minute for the HELLO at 100 bit/s,
    within --give-up; at 1 bit/s --give-up now refuses it at once) or of a backoff sleep (up to 30 s);
    now the edge stops within a poll interval, with the exit code of an interruption."""
    import signal
    import time

    full = case.startswith("waiting")
    cloud = FakeCloud(_welcome(), lambda h: _grad(h, b""),
                      on_hello=(lambda h: _error("server_full", h)) if full else None)
    extra = ("--give-up", "300") + (() if full else ("--bandwidth", "100bit"))
    proc = subprocess.Popen(_edge_cmd(art, cloud.port, tmp_path, *extra), stderr=subprocess.PIPE, text=True)
    try:
        # in the middle of a wait: the 8 s backoff step (after 1-2-4 or 0.5-1-2-4), or the HELLO's emulated send
        _until_line(proc, r"asking again in 8(\.0)?s" if full else "emulated link:", timeout=120)
        if not full:
            time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise AssertionError("edge-train still running 5 s after SIGTERM") from None
        assert time.monotonic() - t0 < 5
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, (proc.returncode, err[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cloud.close()


# ---------------------------------------------------------------------------- terminal injection

HOSTILE_TEXT = "\x1b]0;owned\x07\x1b[2J\x1b[1;1H\r\u202eevil" + "A" * 40_000


def test_a_cloud_error_text_is_capped_and_its_control_characters_escaped(art, tmp_path):
    """D7: the edge printed the cloud's ERROR text whole and raw: escape sequences reached the terminal
    (retitle, clear screen, cursor moves, a bidi override). Now it is capped and escaped, as the cloud
    does with what peers send."""
    from splitedge.runtime_edge.client import RemoteError

    text = str(RemoteError({"code": "bad_message\x1b[31m", "message": HOSTILE_TEXT}))
    assert text.isprintable() and len(text) < 1200, text[:200]
    assert "\\x1b]0;owned\\x07" in text and "\\u202e" in text
    cloud = FakeCloud(_welcome(), lambda h: P.pack(P.MsgType.ERROR, {
        "code": "bad_message", "message": HOSTILE_TEXT, "reply_to": h["id"], "step": h["step"]}))
    try:
        res = _edge(art, cloud.port, tmp_path)
    finally:
        cloud.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "\x1b" not in res.stderr and "\u202e" not in res.stderr and "\x07" not in res.stderr
    assert "the cloud rejected step 1: bad_message: \\x1b]0;owned" in res.stderr, res.stderr[-3000:]
    assert len(res.stderr) < 20_000, "the 40 000-character message is capped"


# ---------------------------------------------------------------------------- protocol version 2: ids and versions


def test_an_edge_refuses_a_version_1_cloud_at_once_and_says_so(art, tmp_path):
    """A cloud of protocol version 1 answers a version-2 HELLO with its own ERROR, framed as version 1
    (what version 1 sends for "protocol version 2 is not supported"). The edge stops at once, naming
    both versions, instead of taking it for noise until --give-up."""
    import json
    import time

    v1_error = [b"SPLE\x01\x09" + json.dumps({"code": "bad_message", "re": None, "step": None,
                                               "message": "protocol version 2 is not supported (this side speaks 1)"}
                                              ).encode()]
    cloud = FakeCloud(_welcome(), lambda h: _grad(h, b""), on_hello=lambda h: v1_error)
    t0 = time.monotonic()
    try:
        res = _edge(art, cloud.port, tmp_path, "--give-up", "60")
    finally:
        cloud.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "speaks splitedge protocol version 1, this edge version 2" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - t0 < 50, "stopped at the first answer, not at --give-up"
    assert cloud.trains == 0


def test_replies_to_other_request_ids_are_dropped(art, tmp_path):
    """The one matching rule: before each real reply the cloud sends a GRAD and an ERROR that answer
    another request id (late duplicates of earlier requests). The edge drops both and trains normally;
    under version 1 the ERROR about a TRAIN of another step would have failed the step only if it named
    the step -- now the id alone decides."""
    good = sc.get("fp32").encode(np.zeros(_act_shape(), np.float32))

    def on_train(h):
        return _grad(h, good)

    class Noisy(FakeCloud):
        def _serve(self):
            while not self._stop.is_set():
                if not self.sock.poll(50):
                    continue
                ident, *frames = self.sock.recv_multipart()
                msg = P.unpack(frames)
                if msg.type == P.MsgType.TRAIN:
                    other = {**msg.header, "id": msg.header["id"] + 1000}
                    self.sock.send_multipart([ident, *_grad(other, b"junk that would not decode")])
                    self.sock.send_multipart([ident, *_error("bad_message", other, step=msg.header["step"])])
                    self.sock.send_multipart([ident, *P.pack_message(P.pong(msg.header["id"] - 1, t=0.0))])
                    self.trains += 1
                    out = on_train(msg.header)
                elif msg.type == P.MsgType.HELLO:
                    out = P.pack(P.MsgType.WELCOME, {"reply_to": msg.header["id"], **self.welcome})
                elif msg.type == P.MsgType.EVAL:
                    n = msg.header["n"]
                    out = P.pack_message(P.eval_result(msg.header["id"], n=n, loss_sum=0.0,
                                                       predictions=np.zeros(n, np.int64)))
                elif msg.type == P.MsgType.PING:
                    out = P.pack_message(P.pong(msg.header["id"], t=msg.header["t"]))
                elif msg.type == P.MsgType.BYE:
                    out = P.pack_message(P.bye_ack(msg.header["id"]))
                else:
                    continue
                self.sock.send_multipart([ident, *out])

    cloud = Noisy(_welcome(), on_train)
    try:
        res = _edge(art, cloud.port, tmp_path)
    finally:
        cloud.close()
    assert res.returncode == 0, res.stderr[-3000:]
    assert cloud.trains == 2 and (tmp_path / "s.json").exists()
