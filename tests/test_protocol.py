"""The wire protocol: header framing, schemas, raw arrays, and rejection of malformed messages."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitedge.wire import protocol as P


def test_round_trip_every_message_type():
    examples = {
        P.MsgType.HELLO: {"id": 1, "client_id": 1, "num_clients": 2, "model": "resnet18", "cut": 3,
                          "activation_shape": [64, 14, 14], "input_shape": [1, 28, 28], "num_classes": 10,
                          "samples": 30000, "resume_step": 0, "planned_steps": 100},
        P.MsgType.TRAIN: {"id": 7, "step": 5, "n": 32, "round": 5, "total_rounds": 100, "encode_ms": 1.5},
        P.MsgType.GRAD: {"reply_to": 7, "step": 5, "loss": 0.25, "correct": 30, "fedavg_round": None, "timings": {}},
        P.MsgType.ERROR: {"reply_to": None, "code": "bad_payload", "message": "truncated"},
        P.MsgType.BYE_ACK: {"reply_to": 8},
    }
    for t, header in examples.items():
        frames = P.pack(t, header, [b"abc", memoryview(b"de")])
        msg = P.unpack(frames)
        assert msg.type == t and msg.header == header and [bytes(f) for f in msg.frames] == [b"abc", b"de"]


@pytest.mark.parametrize(
    "frames,message",
    [
        ([], "empty message"),
        ([b"SPL"], "shorter than"),
        ([b"XXXX\x02\x03{}"], "bad magic"),
        ([b"SPLE\x01\x03{}"], "protocol version 1 is not supported"),
        ([b"SPLE\x03\x03{}"], "protocol version 3 is not supported"),
        ([b"SPLE\x02\x63{}"], "unknown message type 99"),
        ([b"SPLE\x02\x03\xff\xfe"], "not valid UTF-8 JSON"),
        ([b"SPLE\x02\x03[1,2]"], "must be a JSON object"),
        ([b"SPLE\x02\x03{}"], "lacks field 'id'"),
        ([b'SPLE\x02\x03{"id":1}'], "lacks field 'step'"),
        ([b'SPLE\x02\x03{"id":1,"step":"1","n":1,"round":1,"total_rounds":1,"encode_ms":0}'], "'step' must be int"),
        ([b'SPLE\x02\x03{"id":1,"step":true,"n":1,"round":1,"total_rounds":1,"encode_ms":0}'], "'step' must be int"),
        ([b"SPLE\x02\x03" + b" " * P.MAX_HEADER_BYTES], "over the"),
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(frames, message):
    with pytest.raises(P.ProtocolError, match=message):
        P.unpack(frames)


def test_another_version_is_a_version_error_naming_both_versions():
    with pytest.raises(P.VersionError, match="protocol version 1 is not supported .this side speaks 2.") as e:
        P.unpack([b"SPLE\x01\x09" + b'{"code":"x","message":"y"}'])
    assert e.value.version == 1 and e.value.code == P.ErrorCode.UNSUPPORTED_VERSION


def test_a_version_1_peer_gets_an_error_it_can_read():
    """What the cloud sends to a version-1 edge: framed as version 1, an ERROR with the object of
    version 1's ERROR schema (code, message), which a version-1 reader parses."""
    import json
    import struct

    frames = P.pack_version_error(1, "this cloud speaks splitedge protocol version 2")
    magic, version, type_id = struct.unpack_from("<4sBB", frames[0])
    header = json.loads(frames[0][6:])
    assert (magic, version, type_id) == (P.MAGIC, 1, int(P.MsgType.ERROR))
    assert header["code"] == "unsupported_version" and "version 2" in header["message"]
    assert P.pack_version_error(3, "x") is None  # a layout this side does not know: no guess


def test_a_schema_failure_names_the_request_id_it_is_about():
    with pytest.raises(P.ProtocolError) as e:
        P.unpack(P.pack(P.MsgType.TRAIN, {"id": 41, "step": "one"}))
    assert e.value.reply_to == 41
    with pytest.raises(P.ProtocolError) as e:
        P.unpack(P.pack(P.MsgType.TRAIN, {"id": True, "step": 1}))
    assert e.value.reply_to is None


def test_builders_make_messages_that_pass_their_schema():
    """Each builder's message (a request numbered as the channel numbers it) unpacks to the same header."""
    y = np.array([1, 2], dtype=np.int64)
    w = {"b": np.zeros(2, np.float32), "a": np.ones((1, 2), np.float32)}
    requests = [
        P.hello(client_id=0, num_clients=1, model="m", cut=1, activation_shape=(2, 3), input_shape=(1, 4, 4),
                num_classes=3, samples=10, resume_step=0, planned_steps=5, fresh=True),
        P.train(step=1, n=2, total_rounds=5, encode_ms=0.5, activation=b"act", labels=y),
        P.eval_request(activation=b"act", labels=y, n=2), P.eval_request(activation=b"act", labels=None, n=2),
        P.weights(rnd=1, samples=10, params=w), P.bye(reason="finished", steps=5), P.ping(t=1.5),
    ]
    replies = [
        P.welcome(3, session="s", codec={"name": "fp32", "params": {}}, grad_codec={"name": "fp32", "params": {}},
                  fedavg_every=0, last_step=0, server_step=0),
        P.grad(3, step=1, loss=0.5, correct=1, fedavg_round=None, timings={}, gradient=b"g"),
        P.eval_result(3, n=2, loss_sum=None, predictions=y), P.weights_avg(3, rnd=1, params=w, clients=2),
        P.error(3, code="stale_step", message="m", step=1, expected_step=2), P.error(None, code="x", message="m"),
        P.bye_ack(3), P.pong(3, t=1.5),
    ]
    for i, m in enumerate(requests, 1):
        got = P.unpack(P.pack_request(m, i))
        assert m.type in P.REQUESTS and got.type == m.type and got.header == {"id": i, **m.header}
        assert len(got.frames) == len(m.frames)
    for m in replies:
        got = P.unpack(P.pack_message(m))
        assert m.type not in P.REQUESTS and got.header == m.header and "reply_to" in got.header
    assert P.unpack(P.pack_request(requests[4], 9)).header["names"] == ["a", "b"]
    assert set(P.MsgType) == {m.type for m in requests + replies}


def test_header_refuses_nan_and_oversize():
    with pytest.raises(ValueError):
        P.pack(P.MsgType.PING, {"t": float("nan")})
    with pytest.raises(P.ProtocolError, match="over"):
        P.pack(P.MsgType.ERROR, {"code": "x", "message": "y" * P.MAX_HEADER_BYTES})


def test_raw_arrays_and_labels():
    y = np.array([0, 9, 3], dtype=np.int64)
    frame = P.array_frame(y, "int64")
    assert np.array_equal(P.read_labels(frame, 3, 10), y)
    with pytest.raises(P.ProtocolError, match="24 bytes, expected 32"):
        P.read_labels(frame, 4, 10)
    with pytest.raises(P.ProtocolError, match="0..4"):
        P.read_labels(frame, 3, 5)
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(P.read_array(P.array_frame(w, "float32"), "float32", (2, 3), "w"), w)
    with pytest.raises(P.ProtocolError, match="impossible shape"):
        P.read_array(b"", "float32", (-1,), "w")


def test_check_shapes():
    expected = {"a": (2, 3), "b": (4,)}
    assert P.check_shapes(["a", "b"], [[2, 3], [4]], expected, "W") == [(2, 3), (4,)]
    with pytest.raises(P.ProtocolError, match="unknown parameter"):
        P.check_shapes(["c"], [[1]], expected, "W")
    with pytest.raises(P.ProtocolError, match="has shape"):
        P.check_shapes(["a"], [[3, 2]], expected, "W")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_unpack_never_crashes_on_random_frames(frames):
    with contextlib.suppress(P.ProtocolError):
        P.unpack(frames)


# Header values by JSON type, as the protocol accepts them (integers within +-(2**53 - 1), finite floats)
_INT = st.integers(-P.MAX_HEADER_INT, P.MAX_HEADER_INT)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)
_TEXT = st.text(max_size=12)
_LEAF = st.none() | st.booleans() | _INT | _FLOAT | _TEXT
_VALUES = {
    int: _INT, float: _FLOAT, str: _TEXT, bool: st.booleans(), type(None): st.none(),
    list: st.lists(_LEAF, max_size=4), dict: st.dictionaries(_TEXT, _LEAF, max_size=4),
}


def _header(t: P.MsgType) -> st.SearchStrategy[dict]:
    """A header for ``t`` built from ``P.SCHEMAS[t]``: every required field with a value of an accepted type,
    plus a few extra fields (allowed: forward compatible)."""
    schema = P.SCHEMAS[t]
    required = st.fixed_dictionaries({k: st.one_of(*(_VALUES[ty] for ty in types)) for k, types in schema.items()})
    extra = st.dictionaries(_TEXT.filter(lambda k: k not in schema), _LEAF, max_size=3)
    return st.builds(lambda req, ext: {**ext, **req}, required, extra)


def _wrong_value(types: tuple[type, ...]) -> st.SearchStrategy:
    """A value of a JSON type the field does not accept (a bool is no int unless bool is listed)."""
    wrong = [ty for ty in _VALUES if ty not in types and not (ty is int and float in types)]
    return st.one_of(*(_VALUES[ty] for ty in wrong))


@pytest.mark.parametrize("t", list(P.MsgType), ids=lambda t: t.name)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(data=st.data())
def test_unpack_of_valid_framing_with_random_json(t, data):
    """Every message type, with headers drawn from its schema, survives pack -> unpack unchanged."""
    # prepare
    header = data.draw(_header(t))
    # execute
    msg = P.unpack(P.pack(t, header, [b"x"]))
    # assert
    assert msg.type == t and msg.header == header and [bytes(f) for f in msg.frames] == [b"x"]


@pytest.mark.parametrize("t", [t for t in P.MsgType if P.SCHEMAS[t]], ids=lambda t: t.name)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_header_missing_a_field_or_with_a_wrong_type_is_refused_by_name(t, data):
    # prepare: a valid header, then one required field dropped or given a value of another type
    header = data.draw(_header(t))
    key = data.draw(st.sampled_from(sorted(P.SCHEMAS[t])))
    missing = {k: v for k, v in header.items() if k != key}
    mistyped = header | {key: data.draw(_wrong_value(P.SCHEMAS[t][key]))}
    # execute / assert
    with pytest.raises(P.ProtocolError, match=f"{t.name} header lacks field '{key}'"):
        P.unpack(P.pack(t, missing))
    with pytest.raises(P.ProtocolError, match=f"{t.name} field '{key}' must be "):
        P.unpack(P.pack(t, mistyped))
