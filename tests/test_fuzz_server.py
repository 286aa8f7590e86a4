"""Hostile input against a running ``cloud-serve``: hypothesis-generated messages and payloads.

One real cloud-serve process (ResNet-18 cut 3 for 1x28x28, ``--codec uq --bits 4``, small
limits: ``--max-message-mb 4 --max-client-errors 8 --error-window 30 --client-timeout 2``,
FedAvg every 8 steps so that WEIGHTS are read) is shared by the tests of this module.

The limit tests show each limit and check at work on a few messages; each fails if its check
is removed (several failed before the fixes they came with, see ``git log``). Then
``test_fuzz_the_running_server`` sends more than 10,000 generated messages -- every message
type, valid-looking headers with fields dropped, replaced by junk or added, wrong versions
and magic, valid codec payloads of the right and wrong shapes and codecs, truncated,
extended, bit-flipped (with and without a fixed CRC) and with header fields rewritten,
NaN/Inf and huge values, wrong label frames, wrong frame counts, old/repeated/future/extreme
step ids, WEIGHTS with wrong names, shapes, sizes, rounds and values, raw bytes and
almost-JSON headers -- from five DEALER sockets, and checks after every single message:

* the server is alive: the process runs (``proc.poll() is None``; a crash -- an exception
  escaping the message loop -- ends the process) and a PING sent right behind the message
  gets its PONG within ``HANG_S`` (after a hang, e.g. an endless loop on one message, it
  does not);
* the message got exactly one answer (WEIGHTS: at most one), and that answer is an ERROR
  with a known code or the legitimate reply to the request; never ``internal``, which the
  server reserves for its own bugs;

then that the server's RSS after the run is within ``RSS_BOUND_MB`` of its RSS after a
warm-up, that the error codes seen cover every kind of bad input, and that a real
``edge-train`` still trains against the same server.

Runs are reproducible: ``derandomize=True`` (examples derived from the test's source) and
no shrinking (a crashed server would make every shrink step fail the same way; the
falsifying example is printed as generated; hypothesis then reports it as flaky, because
replaying it against the now changed server gives another result).
"""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from splitedge import codecs as sc
from splitedge.lab import launch
from splitedge.wire import protocol as P

SYNTH = "synthetic:n=2048,classes=10,shape=1x28x28,seed=0"
HANG_S = 10.0  # a valid message costs the server milliseconds; no answer in 10 s is a hang
MAX_MESSAGE_MB = 4
MAX_CLIENT_ERRORS = 8
FEDAVG_EVERY = 8  # FedAvg on (so WEIGHTS are read), beyond the final edge's 6 steps
FUZZ_CLIENT_IDS = (0, 1, 2, 3, 4, 5, 6, 7)  # the ids a fuzzing socket says HELLO with
ACT = (64, 14, 14)  # the activation of one sample (ResNet-18 cut 3, 1x28x28)
NUM_CLASSES = 10
# the server's memory after the fuzz may exceed its memory after the warm-up by this much.
# The warm-up already sent the largest messages (4 MiB, decoding to at most 4 MiB of float32
# after the decoded-size check) and trained on the largest batches, so the allocator's pools
# and torch's caches are at their working size; what remains is noise (measured: under 1 MiB).
# A leak of a copy of each message would show: the ~10,000 messages after the warm-up carry
# ~70 MiB. Per-client state is bounded here because the fuzz uses 8 client ids (the server
# keeps a session per client id; it does not cap their number: see SECURITY.md).
RSS_BOUND_MB = 48

SETTINGS = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------- the server


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Cloud:
    def __init__(self, art: Path, workdir: Path):
        self.art = art
        self.workdir = workdir
        self.port = launch.free_port()
        self.metrics = workdir / "metrics.jsonl"
        self.log = workdir / "cloud.log"
        cmd = launch.script("cloud-serve") + [
            "--artifacts", str(art), "--bind", f"tcp://127.0.0.1:{self.port}", "--codec", "uq", "--bits", "4",
            "--threads", "1", "--metrics", str(self.metrics), "--max-message-mb", str(MAX_MESSAGE_MB),
            "--client-timeout", "2", "--max-client-errors", str(MAX_CLIENT_ERRORS), "--error-window", "30",
            "--fedavg-every", str(FEDAVG_EVERY), "--log-every", "0",
        ]
        self.proc = launch.popen_logged(cmd, self.log)
        self.ctx = zmq.Context.instance()

    def dealer(self, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        s.connect(f"tcp://127.0.0.1:{self.port}")
        return s

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"cloud-serve died with code {self.proc.returncode}; its log ends:\n"
                                 + "\n".join(self.log.read_text(errors="replace").splitlines()[-40:]))

    def events(self, kind: str) -> list[dict]:
        return [e for e in launch.read_jsonl(self.metrics) if e["event"] == kind]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def art(exported):
    return exported("resnet18", 3, input_shape=(1, 28, 28), lr=0.02)


@pytest.fixture(scope="module")
def cloud(art, tmp_path_factory):
    c = Cloud(art, tmp_path_factory.mktemp("fuzz-cloud"))
    try:
        s = c.dealer()
        s.send_multipart(P.pack(P.MsgType.PING, {"id": 1, "t": 0}))
        if not s.poll(120_000):  # the first start imports torch
            c.alive()
            raise AssertionError("cloud-serve did not answer a PING within 120 s")
        s.recv_multipart()
        s.close()
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------- messages


def hello(cid: int) -> dict:
    return {"id": 1, "client_id": cid, "num_clients": 64, "model": "resnet18", "cut": 3, "activation_shape": list(ACT),
            "input_shape": [1, 28, 28], "num_classes": NUM_CLASSES, "samples": 100, "resume_step": 0,
            "planned_steps": 10**6}  # step ids beyond it are refused: a plan that leaves room for the jumps below


def train_header(step: int, n: int) -> dict:
    return {"id": 1 + step % 1_000_000, "step": step, "n": n, "round": step, "total_rounds": 100, "encode_ms": 0.1}


def labels(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, n).astype("<i8").tobytes()


def activation(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, *ACT)) * scale).astype(np.float32)


def raw_header(type_id: int, header, *, version: int = P.PROTOCOL_VERSION, magic: bytes = P.MAGIC,
               ascii_only: bool = False) -> bytes:
    """A header frame built by hand: NaN/Infinity allowed, any type id, any JSON value."""
    body = json.dumps(header, allow_nan=True, ensure_ascii=ascii_only, separators=(",", ":"))
    return magic + bytes([version & 0xFF, type_id & 0xFF]) + body.encode("utf-8", "surrogatepass")


class Blob(bytes):
    """Generated frame bytes that print as a short description in hypothesis' reports."""

    note = ""

    def __repr__(self) -> str:
        return f"<{self.note} {len(self)} bytes>"


def blob(data: bytes, note: str) -> Blob:
    b = Blob(data)
    b.note = note
    return b


def fix_crc(blob: bytearray) -> bytes:
    blob[-4:] = struct.pack("<I", zlib.crc32(bytes(blob[:-4])) & 0xFFFFFFFF)
    return bytes(blob)


LEGIT = {P.MsgType.HELLO: P.MsgType.WELCOME, P.MsgType.TRAIN: P.MsgType.GRAD, P.MsgType.EVAL: P.MsgType.EVAL_RESULT,
         P.MsgType.WEIGHTS: P.MsgType.WEIGHTS_AVG, P.MsgType.BYE: P.MsgType.BYE_ACK, P.MsgType.PING: P.MsgType.PONG}
KNOWN_CODES = {v for k, v in vars(P.ErrorCode).items() if k.isupper()}


class Exchange:
    """Sends a message, then a PING with a unique ``t``; everything received before that PONG
    is the message's answer. Checks the answer and keeps the statistics."""

    instances = 0

    def __init__(self, cloud: Cloud, sockets: int = 5):
        self.cloud = cloud
        # four sockets with identities of their own (a ROUTER ignores a second connection with the
        # identity of one it still holds) and one whose identity the ROUTER makes up
        Exchange.instances += 1
        self.socks = [cloud.dealer(b"fuzz-%d-%d" % (Exchange.instances, i)) for i in range(sockets - 1)]
        self.socks.append(cloud.dealer())
        self.applied = [0] * sockets  # the last step each socket's client had applied (from GRADs)
        self.sent = 0
        self.bytes = 0
        self.answers: Counter = Counter()
        self.codes: Counter = Counter()
        self._sentinel = -1e15

    def send(self, i: int, frames: list) -> list[P.Message]:
        s = self.socks[i]
        try:
            parsed = P.unpack(frames)
            req, rid = parsed.type, parsed.header["id"]
        except (P.ProtocolError, KeyError):
            req = rid = None
        s.send_multipart(frames, copy=True)
        self.sent += 1
        self.bytes += sum(len(f) for f in frames)
        self._sentinel -= 1
        t = self._sentinel
        s.send_multipart(P.pack(P.MsgType.PING, {"id": 1, "t": t}))
        out: list[P.Message] = []
        while True:
            if not s.poll(int(HANG_S * 1000)):
                self.cloud.alive()
                raise AssertionError(f"no PONG within {HANG_S:.0f}s after a {req!r} message: the server hangs")
            got = s.recv_multipart()
            try:
                m = P.unpack(got)
            except P.VersionError as e:
                # to a version-1 message, a version-1 ERROR: only then, and with the code that says why
                assert e.version == 1 and frames and bytes(frames[0][4:5]) == b"\x01", e
                m = P.Message(P.MsgType.ERROR, json.loads(bytes(got[0][6:])))
                assert set(m.header) == {"code", "message", "re", "step"}, m.header
                assert m.header["code"] == P.ErrorCode.UNSUPPORTED_VERSION, m.header
                m.header["reply_to"] = None
            except P.ProtocolError as e:
                raise AssertionError(f"the server sent a message that breaks the protocol: {e}") from None
            if m.type == P.MsgType.PONG and m.header.get("t") == t:
                break
            out.append(m)
        self.cloud.alive()
        return self._check(i, req, rid, out)

    def _check(self, i: int, req: P.MsgType | None, rid: int | None, out: list[P.Message]) -> list[P.Message]:
        """The answer to the message: ``out`` less WEIGHTS_AVG of earlier rounds."""
        strict = []
        answer = []
        for m in out:
            if m.type == P.MsgType.WEIGHTS_AVG and (req != P.MsgType.WEIGHTS or m.header["reply_to"] != rid):
                continue  # a FedAvg round this client had joined earlier, completed by another client's timeout
            answer.append(m)
            if m.type == P.MsgType.ERROR:
                code = m.header["code"]
                self.codes[code] += 1
                assert code in KNOWN_CODES, m.header
                assert code != P.ErrorCode.INTERNAL, f"the server reports an internal error: {m.header}"
                if code == P.ErrorCode.TOO_MANY_ERRORS:
                    assert out.index(m) > 0, "too_many_errors follows the error that was one too many"
                    self.applied[i] = 0
                    continue
                if code == P.ErrorCode.UNKNOWN_CLIENT:
                    self.applied[i] = 0
            elif m.type == P.MsgType.GRAD:
                self.applied[i] = max(self.applied[i], int(m.header["step"]))
            elif m.type == P.MsgType.WELCOME:
                self.applied[i] = int(m.header["last_step"])
            self.answers[m.type.name] += 1
            strict.append(m)
        if req == P.MsgType.WEIGHTS:
            assert len(strict) <= 1, [m.header for m in strict]
        else:
            assert len(strict) == 1, f"{req!r} got {len(strict)} answers: {[(m.type, m.header) for m in strict]}"
        for m in strict:
            assert m.type == P.MsgType.ERROR or m.type == LEGIT.get(req), f"{req!r} answered with {m.type!r}"
            if req is not None:  # every answer to a valid request names that request's id
                assert m.header["reply_to"] == rid, (req, rid, m.header)
        return answer

    def hello(self, i: int, cid: int) -> None:
        out = self.send(i, P.pack(P.MsgType.HELLO, hello(cid)))
        assert any(m.type == P.MsgType.WELCOME for m in out), [m.header for m in out]

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)


# ---------------------------------------------------------------------------- limit tests


@pytest.fixture
def ex(cloud):
    e = Exchange(cloud)
    yield e
    e.close()


def test_an_oversized_message_is_dropped_unread_and_the_server_goes_on(cloud, ex):
    """--max-message-mb: libzmq drops a peer whose message is over the limit before allocating it.
    Without the limit the 5 MiB message below would be read and answered (bad_payload)."""
    ex.hello(0, 0)
    errors_before = len(cloud.events("error"))
    big = bytes(5 * 1024 * 1024)
    s = ex.socks[0]
    s.send_multipart(P.pack(P.MsgType.TRAIN, train_header(1, 1), [big, labels(1)]))
    assert not s.poll(3000), "an over-limit message was answered: it was read"
    cloud.alive()
    # just under the limit: read, answered, counted (so the silence above is the size limit's)
    under = bytes(MAX_MESSAGE_MB * 1024 * 1024 - 4096)
    probe = cloud.dealer(b"probe-under")
    probe.send_multipart(P.pack(P.MsgType.HELLO, hello(1)))
    assert probe.poll(HANG_S * 1000) and P.unpack(probe.recv_multipart()).type == P.MsgType.WELCOME
    probe.send_multipart(P.pack(P.MsgType.TRAIN, train_header(1, 1), [under, labels(1)]))
    assert probe.poll(HANG_S * 1000), "a message under the limit got no answer"
    assert P.unpack(probe.recv_multipart()).header["code"] == "bad_payload"
    probe.close()
    # the dropped socket reconnects by itself and is served again
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        s.send_multipart(P.pack(P.MsgType.PING, {"id": 1, "t": 1.5}))
        if s.poll(500):
            assert P.unpack(s.recv_multipart()).type == P.MsgType.PONG
            break
    else:
        raise AssertionError("the dropped socket was never served again")
    assert len(cloud.events("error")) == errors_before + 1, "only the message under the limit was read"


def test_a_compressed_payload_may_not_decode_to_more_than_the_message_limit(cloud, ex):
    """A 1-bit uq payload of 100 samples is 157 KB on the wire but 5 MB of float32: over the
    4 MiB limit, refused before the array is allocated (so 4 MiB messages cannot make the
    server allocate 32 times that). Within the limit, the same codec trains."""
    ex.hello(0, 2)
    one_bit = sc.get("uq", bits=1)
    out = ex.send(0, P.pack(P.MsgType.TRAIN, train_header(1, 100), [one_bit.encode(activation(100)), labels(100)]))
    assert out[0].header["code"] == "bad_payload" and "size limit" in out[0].header["message"], out[0].header
    out = ex.send(0, P.pack(P.MsgType.TRAIN, train_header(1, 20), [one_bit.encode(activation(20)), labels(20)]))
    assert out[0].type == P.MsgType.GRAD, out[0].header


def test_wrong_shapes_labels_and_non_finite_values_are_refused(cloud, ex):
    """The manifest's shape, the labels' size and range, finite values: each has its own error
    code (without the checks torch would raise -> internal, or train on NaN)."""
    ex.hello(1, 3)
    uq = sc.get("uq", bits=4, grid="minmax")  # payload version 1: the range is patched at bytes 41:49 below
    wrong = uq.encode(np.ones((2, 64, 7, 7), np.float32))
    assert ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [wrong, labels(2)]))[0].header["code"] \
        == "shape_mismatch"
    good = uq.encode(activation(2))
    for bad_labels, what in ((labels(3), "labels: 24 bytes"), (np.array([0, 10], "<i8").tobytes(), "labels must lie"),
                             (np.array([-1, 0], "<i8").tobytes(), "labels must lie")):
        h = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [good, bad_labels]))[0].header
        assert h["code"] == "bad_message" and what in h["message"], h
    # non-finite values: a uq range of NaN (the codec refuses it: bad_payload), a range of +-3e38
    # (decodes to Inf: the server's own check), and valid payloads of huge finite values whose loss
    # overflows (the step is refused, nothing of it applied); none may reach the model
    nan = bytearray(good)
    nan[41:49] = np.array([np.nan, 1.0], "<f4").tobytes()  # uq: 32-byte header, 1 parameter byte, 2x4 table
    h = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [fix_crc(nan), labels(2)]))[0].header
    assert h["code"] in ("bad_payload", "not_finite") and "NaN" in h["message"], h
    wide = bytearray(good)
    wide[41:49] = np.array([-3e38, 3e38], "<f4").tobytes()
    h = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [fix_crc(wide), labels(2)]))[0].header
    assert h["code"] == "not_finite", h
    # one sample: ResNet-18's last BatchNorm sees one value per channel and cannot train on it
    h = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 1), [uq.encode(activation(1)), labels(1)]))[0].header
    assert h["code"] == "bad_message" and "not applied" in h["message"], h
    # the model is not poisoned: a normal step still has a finite loss
    out = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [good, labels(2)]))
    assert out[0].type == P.MsgType.GRAD and np.isfinite(out[0].header["loss"]), out[0].header
    codes = {e["code"] for e in cloud.events("error") if e["client"] == 3}
    assert {"shape_mismatch", "bad_message", "not_finite"} <= codes, "errors are counted in the metrics"


def test_a_payload_of_another_codec_is_refused(cloud, ex):
    """The cloud's codec is authoritative (WELCOME says which): a valid payload of another codec
    is refused before the step. (A cloud with sgq, randtopk, splitfc or clio applied such a step,
    then failed in its codec's backward rule, which needs that codec's own metadata: 'internal'.)"""
    ex.hello(1, 7)
    for name in ("fp32", "sgq"):
        out = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [sc.get(name).encode(activation(2)), labels(2)]))
        assert out[0].header["code"] == "bad_payload" and name in out[0].header["message"], out[0].header
    out = ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [sc.get("uq", bits=2).encode(activation(2)),
                                                                  labels(2)]))
    assert out[0].type == P.MsgType.GRAD, "the cloud's codec with other parameters (2 bits, not 4) is fine"


def weights_message(shapes: dict, rnd: int, seed: int = 0) -> list:
    names = sorted(shapes)
    rng = np.random.default_rng(seed)
    return P.pack(P.MsgType.WEIGHTS, {"id": 7, "round": rnd, "samples": 10, "names": names,
                                      "shapes": [list(shapes[k]) for k in names]},
                  [rng.standard_normal(shapes[k]).astype("<f4").tobytes() for k in names])


def test_weights_are_taken_only_for_the_round_the_client_is_at(cloud, ex, art):
    """With FedAvg every 8 steps, a client whose last step is 8 sends WEIGHTS for round 1 and no
    other: weights for other rounds would wait in the cloud's memory for rounds that may never
    complete (and could be averaged into other clients' rounds)."""
    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.fedavg import client_param_shapes

    shapes = client_param_shapes(mf.load(art))
    ex.hello(2, 8)
    out = ex.send(2, weights_message(shapes, 1))
    assert [m.header.get("code") for m in out] == ["unexpected"], "no step yet: no round to send weights for"
    grad = ex.send(2, P.pack(P.MsgType.TRAIN, train_header(FEDAVG_EVERY, 2),
                             [sc.get("uq", bits=4).encode(activation(2)), labels(2)]))[0]
    assert grad.type == P.MsgType.GRAD and grad.header["fedavg_round"] == 1
    for rnd in (0, 2, 3, 10**6):
        out = ex.send(2, weights_message(shapes, rnd))
        assert [m.header.get("code") for m in out] == ["unexpected"], rnd
    out = ex.send(2, weights_message(shapes, 1))
    assert not [m.header for m in out if m.type == P.MsgType.ERROR], "round 1 is this client's round"
    # taken: averaged once no other active client owes round 1 (idle fuzz clients time out after 2 s)
    deadline = time.monotonic() + 60
    while not any(e["round"] == 1 and 8 in e["clients"] for e in cloud.events("fedavg")):
        cloud.alive()
        assert time.monotonic() < deadline, "client 8's weights for round 1 were never averaged"
        time.sleep(0.2)


def test_header_values_are_checked_before_the_step_is_applied(cloud, ex):
    """A TRAIN whose round/total_rounds the gradient codec refuses is refused before the server
    model trains on it (it used to be applied, then fail: 'internal', and applied again on retry)."""
    ex.hello(1, 6)
    uq = sc.get("uq", bits=4)
    for bad in ({"round": -1}, {"total_rounds": 0}):
        h = ex.send(1, P.pack(P.MsgType.TRAIN, {**train_header(1, 2), **bad}, [uq.encode(activation(2)), labels(2)]))
        assert h[0].header["code"] == "bad_message" and "round" in h[0].header["message"], h[0].header
    assert ex.send(1, P.pack(P.MsgType.TRAIN, train_header(1, 2), [uq.encode(activation(2)), labels(2)]))[0].type \
        == P.MsgType.GRAD
    server_steps = [e["server_step"] for e in cloud.events("step")]
    assert len(server_steps) == len(set(server_steps)) and server_steps == sorted(server_steps)
    assert [e["step"] for e in cloud.events("step") if e["client"] == 6] == [1]


def test_a_refused_step_changes_nothing_in_the_server_model(art):
    """Activations that are finite but overflow in the model (sums of +-3e38), and a batch the
    model cannot train on: refused, and weights, BatchNorm statistics and optimizer state are
    exactly as before (without the check the step would be applied, or half applied)."""
    import torch

    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.trainer import ServerModel, StepRefused

    m = ServerModel(art, mf.load(art), optimizer="sgd", lr=0.01, momentum=0.9)
    y = np.arange(4) % NUM_CLASSES
    m.train_step(activation(4), y)  # momentum buffers exist from here

    def state():
        return {**{k: v.clone() for k, v in m.model.state_dict().items()},
                **{f"opt.{i}": st["momentum_buffer"].clone() for i, st in m.opt.state_dict()["state"].items()}}

    before = state()
    x = np.full((4, *ACT), 3e38, np.float32)
    x[:, ::2] *= -1
    with pytest.raises(StepRefused) as e:
        m.train_step(x, y)
    assert e.value.not_finite
    with pytest.raises(StepRefused, match="cannot train on this batch") as e:
        m.train_step(activation(1), y[:1])
    assert not e.value.not_finite
    after = state()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert np.isfinite(m.train_step(activation(4), y).loss)


def test_a_client_over_its_error_budget_is_disconnected(cloud, ex):
    """--max-client-errors 8 per --error-window 30: the 9th bad message ends the session
    (stale steps do not count: they are what a retry after a lost reply gets)."""
    ex.hello(2, 4)
    good = sc.get("uq", bits=4).encode(activation(2))
    assert ex.send(2, P.pack(P.MsgType.TRAIN, train_header(1, 2), [good, labels(2)]))[0].type == P.MsgType.GRAD
    for _ in range(3 * MAX_CLIENT_ERRORS):
        assert ex.send(2, P.pack(P.MsgType.TRAIN, train_header(0, 2), [good, labels(2)]))[0].header["code"] \
            == "stale_step"
    for k in range(MAX_CLIENT_ERRORS):
        out = ex.send(2, P.pack(P.MsgType.EVAL, {"id": k, "n": 1, "has_labels": False}, [b"junk"]))
        assert [m.header["code"] for m in out] == ["bad_payload"]
    out = ex.send(2, P.pack(P.MsgType.EVAL, {"id": 99, "n": 1, "has_labels": False}, [b"junk"]))
    assert [m.header["code"] for m in out] == ["bad_payload", "too_many_errors"]
    out = ex.send(2, P.pack(P.MsgType.TRAIN, train_header(2, 2), [good, labels(2)]))
    assert out[0].header["code"] == "unknown_client", "the session is gone"
    assert [e["client"] for e in cloud.events("client_dropped")].count(4) == 1


def test_retries_are_answered_from_the_cache_and_older_steps_are_stale(cloud, ex):
    """Idempotent step ids: a retry of the last applied step gets the very same reply and is
    not applied again; an older step gets stale_step with expected_step."""
    ex.hello(3, 5)
    uq = sc.get("uq", bits=4)
    first = ex.send(3, P.pack(P.MsgType.TRAIN, train_header(1, 2), [uq.encode(activation(2, 1)), labels(2, 1)]))
    # the retry carries other bytes: the cache answers by step id, it does not compute again
    again = ex.send(3, P.pack(P.MsgType.TRAIN, train_header(1, 2), [uq.encode(activation(2, 2)), labels(2, 2)]))
    assert first[0].type == again[0].type == P.MsgType.GRAD
    assert first[0].header == again[0].header and bytes(first[0].frames[0]) == bytes(again[0].frames[0])
    stale = ex.send(3, P.pack(P.MsgType.TRAIN, train_header(0, 2), [uq.encode(activation(2)), labels(2)]))[0].header
    assert stale["code"] == "stale_step" and stale["expected_step"] == 2
    # the largest step id a header can carry is not a step: the step after it could not be named
    out = ex.send(3, P.pack(P.MsgType.TRAIN, train_header(P.MAX_HEADER_INT, 2), [uq.encode(activation(2)), labels(2)]))
    assert out[0].header["code"] == "bad_message" and "beyond the last step id" in out[0].header["message"]
    nxt = ex.send(3, P.pack(P.MsgType.TRAIN, train_header(2, 2), [uq.encode(activation(2)), labels(2)]))
    assert nxt[0].type == P.MsgType.GRAD
    steps = [e["step"] for e in cloud.events("step") if e["client"] == 5]
    assert steps == [1, 2], "step 1 was applied once"
    assert [e["step"] for e in cloud.events("retry") if e["client"] == 5] == [1]


# ---------------------------------------------------------------------------- strategies


CODECS = ["uq", "fp32", "fp16", "clio", "splitfc", "randtopk", "easyquant", "powerquant"]
seeds = st.integers(0, 2**32 - 1)
extreme_ints = st.sampled_from([0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64,
                                10**30, -(2**63), 10**4000])


class LongText(str):
    def __repr__(self) -> str:
        return f"<{len(self)} x {self[:1]!r}>"


long_text = st.integers(1, 40_000).map(lambda k: LongText("\u00e9" * k))  # 2 bytes in UTF-8, 6 as a \u escape
junk = st.one_of(
    st.none(), st.booleans(), st.integers(), extreme_ints,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), long_text,
    st.lists(st.integers(-5, 70), max_size=5), st.integers(1, 20_000).map(lambda k: [1] * k),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)


@st.composite
def mutated(draw, header: dict) -> dict:
    """A header with 0-3 fields dropped, replaced by junk or added."""
    h = dict(header)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "junk", "junk", "add", "step"]))
        keys = sorted(h)
        if op == "drop" and keys:
            h.pop(draw(st.sampled_from(keys)))
        elif op == "junk" and keys:
            h[draw(st.sampled_from(keys))] = draw(junk)
        elif op == "add":
            h[draw(st.text(max_size=8))] = draw(junk)
        else:  # ERROR replies echo "step": make it anything
            h["step"] = draw(junk)
    return h


WEIGHTS_IDS = itertools.count(10**6)  # each WEIGHTS its own request id: its WEIGHTS_AVG names it


def templates(step: int, n: int, cid: int) -> dict[int, dict]:
    return {
        P.MsgType.HELLO: hello(cid), P.MsgType.TRAIN: train_header(step, n),
        P.MsgType.EVAL: {"id": 1, "n": n, "has_labels": True},
        P.MsgType.WEIGHTS: {"id": next(WEIGHTS_IDS), "round": 1, "samples": 10, "names": ["conv1.weight"], "shapes": [[64, 1, 7, 7]]},
        P.MsgType.BYE: {"id": 1, "reason": "fuzz", "steps": step}, P.MsgType.PING: {"id": 1, "t": 1.0},
        P.MsgType.WELCOME: {"reply_to": 1, "session": "x", "codec": {"name": "uq", "params": {}}, "grad_codec": {}, "fedavg_every": 0,
                            "last_step": 0, "server_step": 0},
        P.MsgType.GRAD: {"reply_to": 1, "step": step, "loss": 1.0, "correct": 0, "fedavg_round": None, "timings": {}},
        P.MsgType.EVAL_RESULT: {"reply_to": 1, "n": n, "loss_sum": None},
        P.MsgType.WEIGHTS_AVG: {"reply_to": 1, "round": 1, "names": [], "shapes": [], "clients": 1},
        P.MsgType.ERROR: {"reply_to": 1, "code": "internal", "message": "x"}, P.MsgType.BYE_ACK: {"reply_to": 1},
        P.MsgType.PONG: {"reply_to": 1, "t": 1.0},
    }


@st.composite
def payload(draw, n: int) -> Blob:
    """A codec payload for n samples: valid, of another codec or shape, non-finite, huge, or mutated."""
    kind = draw(st.sampled_from(["valid"] * 8 + ["codec", "shape", "nan", "huge", "header", "flip", "flip_crc",
                                                  "truncate", "extend", "random", "empty"]))
    rng = np.random.default_rng(draw(seeds))
    if kind == "random":
        return blob(rng.bytes(draw(st.integers(0, 4096))), "random")
    if kind == "empty":
        return blob(b"", "empty")
    shape = (n, *ACT)
    if kind == "shape":
        shape = draw(st.sampled_from([(n + 1, *ACT), (n, 64, 7, 7), (n, 32, 14, 14), (n, 64, 14, 15), (n, 12544),
                                      (1, n, 64, 14), (n, 64 * 14 * 14, 1)]))
    scale = 3e37 if kind == "huge" else draw(st.sampled_from([1.0, 1.0, 1e-30, 1e3, 1e15]))
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    name = draw(st.sampled_from(CODECS)) if kind in ("codec", "nan", "header") else "uq"
    params = {"bits": draw(st.integers(1, 8))} if name in ("uq", "clio", "easyquant", "powerquant", "splitfc") else {}
    b = bytearray(sc.get(name, **params).encode(x))
    note = f"{kind} {name}{params} {'x'.join(map(str, shape))} scale {scale:g}"
    if kind == "nan":  # non-finite values where the codec keeps floats (its ranges, scales, fp32 values)
        at = draw(st.integers(32, len(b) - 8))
        at -= (at - 32) % 4
        v = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        b[at:at + 4] = np.array([v], "<f4").tobytes()
        return blob(fix_crc(b), f"{note}, {v} at {at}")
    if kind == "header":  # one field of the payload header, with a correct CRC
        off, fmt = draw(st.sampled_from([(5, "B"), (6, "B"), (7, "B"), (8, "B"), (9, "B"), (10, "H"), (12, "I"),
                                         (16, "I"), (20, "I"), (24, "I"), (28, "I"), (32, "B")]))
        bits = 8 * struct.calcsize(fmt)
        value = draw(st.one_of(st.integers(0, 2**bits - 1), st.sampled_from([0, 1, 2, 3, 4, 255, 2**16 - 1, 2**32 - 1])))
        struct.pack_into("<" + fmt, b, off, value % 2**bits)
        return blob(fix_crc(b), f"{note}, field at {off} = {value % 2**bits}")
    if kind in ("flip", "flip_crc"):
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
        return blob(fix_crc(b) if kind == "flip_crc" else bytes(b), note)
    if kind == "truncate":
        return blob(bytes(b[: draw(st.integers(0, len(b) - 1))]), note)
    if kind == "extend":
        return blob(bytes(b) + rng.bytes(draw(st.integers(1, 64))), note)
    return blob(bytes(b), note)


@st.composite
def label_frame(draw, n: int) -> Blob:
    kind = draw(st.sampled_from(["ok"] * 10 + ["short", "long", "range", "negative", "huge", "float", "empty"]))
    y = np.random.default_rng(draw(seeds)).integers(0, NUM_CLASSES, n).astype("<i8")
    if kind == "short":
        return blob(y.tobytes()[:-1], "labels short")
    if kind == "long":
        return blob(y.tobytes() + b"\x00" * 8, "labels long")
    if kind in ("range", "negative", "huge"):
        y[draw(st.integers(0, n - 1))] = {"range": NUM_CLASSES, "negative": -1, "huge": 2**62}[kind]
    if kind == "float":
        return blob(y.astype("<f8").tobytes(), "labels float64")
    if kind == "empty":
        return blob(b"", "labels empty")
    return blob(y.tobytes(), f"labels {kind}")


@st.composite
def step_ids(draw, applied: int) -> int:
    """Next, retry of the last, older, a jump ahead, or an extreme id."""
    mode = draw(st.sampled_from(["next"] * 6 + ["same", "same", "older", "jump", "extreme"]))
    return {"next": applied + 1, "same": applied, "older": applied - 1, "jump": applied + 1 + draw(st.integers(1, 1000)),
            "extreme": draw(extreme_ints)}[mode]


# ---------------------------------------------------------------------------- the fuzz


@pytest.mark.slow
def test_fuzz_the_running_server(cloud, art):
    from splitedge.export import manifest as mf
    from splitedge.runtime_cloud.fedavg import client_param_shapes

    weight_shapes = client_param_shapes(mf.load(art))
    ex = Exchange(cloud)

    def train_or_eval(i: int, data, what: str) -> list:
        n = data.draw(st.sampled_from([1, 2, 2, 3, 4]), label="n")  # one sample: BatchNorm refuses it
        blob = data.draw(payload(n), label="payload")
        y = data.draw(label_frame(n), label="labels")
        if what == "train":
            step = data.draw(step_ids(ex.applied[i]), label="step")
            h = train_header(step, n)
            if data.draw(st.integers(0, 9)) == 0:
                h = data.draw(mutated(h))
            frames = [blob, y]
            typ = P.MsgType.TRAIN
        else:
            has = data.draw(st.booleans())
            h = {"id": data.draw(st.integers(0, 100)), "n": n, "has_labels": has}
            frames = [blob, y] if has else [blob]
            typ = P.MsgType.EVAL
        if data.draw(st.integers(0, 9)) == 0:  # a frame too many or too few
            frames = frames + [y] if data.draw(st.booleans()) else frames[:-1]
        return ex.send(i, [raw_header(typ, h), *frames])

    # -- family 1: a session, then train/eval steps with generated payloads, labels and step ids
    def session_steps(data):
        i = data.draw(st.integers(0, len(ex.socks) - 1), label="socket")
        ex.hello(i, data.draw(st.sampled_from(FUZZ_CLIENT_IDS), label="client"))
        for _ in range(data.draw(st.integers(1, 6))):
            train_or_eval(i, data, data.draw(st.sampled_from(["train"] * 3 + ["eval"])))

    @settings(max_examples=250, **SETTINGS)
    @given(data=st.data())
    def steps_warm_up(data):
        session_steps(data)

    @settings(max_examples=1000, **SETTINGS)
    @given(data=st.data())
    def steps(data):
        session_steps(data)

    # -- family 2: every message type, valid-looking headers with fields dropped/replaced/added,
    #    wrong versions and magic, random frames
    @settings(max_examples=1000, **SETTINGS)
    @given(data=st.data())
    def headers(data):
        i = data.draw(st.integers(0, len(ex.socks) - 1), label="socket")
        if data.draw(st.booleans()):
            ex.hello(i, data.draw(st.sampled_from(FUZZ_CLIENT_IDS)))
        for _ in range(data.draw(st.integers(1, 5))):
            type_id = data.draw(st.one_of(st.sampled_from(list(P.MsgType)), st.integers(0, 255)), label="type")
            h = templates(ex.applied[i] + 1, 1, data.draw(st.sampled_from(FUZZ_CLIENT_IDS))).get(type_id, {})
            if type_id == P.MsgType.HELLO and data.draw(st.booleans()):  # other artifacts than the cloud's
                key, value = data.draw(st.sampled_from([("model", "vgg11"), ("cut", 4), ("num_classes", 100),
                                                        ("activation_shape", [64, 7, 7]), ("input_shape", [3, 32, 32])]))
                h[key] = value
            h = data.draw(mutated(h), label="header")
            version = data.draw(st.sampled_from([P.PROTOCOL_VERSION] * 8 + [0, 1, 3, 255]))
            magic = data.draw(st.sampled_from([P.MAGIC] * 8 + [b"SPEC", b"\x00\x00\x00\x00", b"SPL"]))
            nframes = data.draw(st.integers(0, 3))
            frames = []
            for _ in range(nframes):
                k = data.draw(st.sampled_from(["bytes", "payload", "labels"]))
                frames.append(data.draw(st.binary(max_size=64)) if k == "bytes" else
                              data.draw(payload(1)) if k == "payload" else labels(1))
            try:
                head = raw_header(int(type_id), h, version=version, magic=magic,
                                  ascii_only=data.draw(st.booleans()))
            except (ValueError, OverflowError):  # e.g. an int json cannot print
                head = raw_header(int(type_id), {}, version=version, magic=magic)
            ex.send(i, [head, *frames])

    # -- family 3: WEIGHTS (FedAvg every 8 steps), often right after a step that ended a round, with
    #    right and wrong names, shapes, sizes, rounds and values
    names = sorted(weight_shapes)

    @settings(max_examples=250, **SETTINGS)
    @given(data=st.data())
    def weights(data):
        i = data.draw(st.integers(0, len(ex.socks) - 1), label="socket")
        ex.hello(i, data.draw(st.sampled_from(FUZZ_CLIENT_IDS)))
        if data.draw(st.integers(0, 3)):  # a step that ends a round (step ids may jump ahead)
            end = (ex.applied[i] // FEDAVG_EVERY + 1) * FEDAVG_EVERY
            ex.send(i, P.pack(P.MsgType.TRAIN, train_header(end, 2),
                              [sc.get("uq", bits=4).encode(activation(2, end)), labels(2, end)]))
        current = ex.applied[i] // FEDAVG_EVERY if ex.applied[i] % FEDAVG_EVERY == 0 else 0
        for _ in range(data.draw(st.integers(1, 4))):
            ns = list(names)
            kind = data.draw(st.sampled_from(["ok", "ok", "missing", "extra", "unknown", "shape", "size", "nan",
                                              "mismatch"]), label="kind")
            if kind == "missing":
                ns.pop(data.draw(st.integers(0, len(ns) - 1)))
            if kind == "extra":
                ns.append(data.draw(st.sampled_from(ns)))
            if kind == "unknown":
                ns[data.draw(st.integers(0, len(ns) - 1))] = data.draw(st.one_of(st.text(max_size=30), long_text))
            shapes = [list(weight_shapes.get(k, (1,))) for k in ns]
            if kind == "shape":
                shapes[0] = data.draw(st.lists(st.integers(0, 70), max_size=4))
            if kind == "mismatch":
                shapes = shapes[:-1]
            rng = np.random.default_rng(data.draw(seeds))
            arrays = [rng.standard_normal(int(np.prod(weight_shapes.get(k, (1,))))).astype("<f4") for k in ns]
            if kind == "size":
                arrays[-1] = arrays[-1][:-1]
            if kind == "nan":
                arrays[0][0] = data.draw(st.sampled_from([np.nan, np.inf]))
            rnd = data.draw(st.one_of(st.just(current), st.just(current), st.integers(0, 3), extreme_ints,
                                      st.integers()), label="round")
            h = {"id": next(WEIGHTS_IDS), "round": rnd, "samples": data.draw(st.one_of(st.integers(-5, 100), extreme_ints)), "names": ns,
                 "shapes": shapes}
            try:
                head = raw_header(P.MsgType.WEIGHTS, h)
            except (ValueError, OverflowError):
                head = raw_header(P.MsgType.WEIGHTS, {**h, "round": 1, "samples": 1})
            ex.send(i, [head, *[a.tobytes() for a in arrays]])

    # -- family 4: raw bytes, and header frames that are almost JSON
    json_texts = st.sampled_from([
        b"", b"{", b"[]", b'"x"', b"3", b"null", b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}',
        b'{"t": 1e400}', b'{"t": 1}{"t": 2}', b'{"t": 1, "t": "x"}', b"[" * 5000, b"[" * 40000 + b"]" * 40000,
        b'{"t": ' + b"9" * 5000 + b"}", b"\xff\xfe{}", b'{"t": "\xed\xa0\x80"}', b'{"t": 1}\x00',
    ])

    @settings(max_examples=400, **SETTINGS)
    @given(data=st.data())
    def raw(data):
        i = data.draw(st.integers(0, len(ex.socks) - 1), label="socket")
        for _ in range(data.draw(st.integers(1, 5))):
            if data.draw(st.booleans()):
                frames = data.draw(st.lists(st.binary(max_size=200), min_size=1, max_size=4), label="frames")
            else:
                type_id = data.draw(st.integers(0, 15))
                frames = [P.MAGIC + bytes([P.PROTOCOL_VERSION, type_id]) + data.draw(json_texts, label="json")]
                frames += data.draw(st.lists(st.binary(max_size=32), max_size=2))
            ex.send(i, frames)

    # warm-up: the largest messages and batches this server accepts, then the memory baseline
    ex.hello(0, 0)
    biggest_n = (MAX_MESSAGE_MB * 1024 * 1024) // (4 * int(np.prod(ACT)))  # float32 decoded size at the limit
    for k in range(1, 6):
        for n in (biggest_n, 4):
            out = ex.send(0, P.pack(P.MsgType.TRAIN, train_header(ex.applied[0] + 1, n),
                                    [sc.get("uq", bits=8).encode(activation(n, k)), labels(n, k)]))
            assert out[0].type == P.MsgType.GRAD, out[0].header
        ex.send(0, P.pack(P.MsgType.EVAL, {"id": k, "n": biggest_n, "has_labels": True},
                          [sc.get("uq", bits=8).encode(activation(biggest_n, k)), labels(biggest_n, k)]))
    steps_warm_up()
    rss0, sent0, bytes0 = _rss_mb(cloud.proc.pid), ex.sent, ex.bytes
    t0 = time.monotonic()
    for fam in (headers, weights, raw, steps):
        fam()
        print(f"  {fam.__name__}: {ex.sent} messages sent so far, server RSS {_rss_mb(cloud.proc.pid):.1f} MiB")
    rss1 = _rss_mb(cloud.proc.pid)
    print(f"fuzz: {ex.sent} messages in all; after the warm-up {ex.sent - sent0} messages "
          f"({(ex.bytes - bytes0) / 2**20:.0f} MiB) in {time.monotonic() - t0:.0f}s; answers {dict(ex.answers)}; "
          f"error codes {dict(ex.codes)}; RSS {rss0:.1f} -> {rss1:.1f} MiB")
    ex.close()

    assert ex.sent >= 10_000
    assert (ex.bytes - bytes0) / 2**20 > RSS_BOUND_MB, "the bound must be smaller than what a leak of every message is"
    assert rss1 - rss0 < RSS_BOUND_MB, f"RSS grew from {rss0:.0f} to {rss1:.0f} MiB"
    expected = {"bad_message", "bad_payload", "shape_mismatch", "not_finite", "unknown_client", "stale_step",
                "incompatible", "unexpected", "too_many_errors"}
    assert expected <= set(ex.codes), f"error codes seen: {dict(ex.codes)}"
    assert ex.answers["GRAD"] >= 300 and ex.answers["EVAL_RESULT"] >= 100, "the fuzz must also train and evaluate"

    # ... and the server still serves a real edge, with a client id no fuzzing socket used
    used = {e["client"] for e in cloud.events("client_joined")}
    cid = next(c for c in range(8, 64) if c not in used)
    res = subprocess.run(launch.script("edge-train") + [
        "--artifacts", str(art), "--connect", f"tcp://127.0.0.1:{cloud.port}", "--data", SYNTH,
        "--client-id", str(cid), "--num-clients", "64", "--steps", "6", "--batch-size", "16", "--eval-samples", "32",
        "--threads", "1", "--no-progress", "--timeout", "5", "--give-up", "60",
        "--summary", str(cloud.workdir / "edge.json")], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((cloud.workdir / "edge.json").read_text())["steps"] == 6
    assert sorted(e["step"] for e in cloud.events("step") if e["client"] == cid) == list(range(1, 7))
    cloud.alive()
