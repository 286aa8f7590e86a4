"""The wire protocol between ``edge-train`` (DEALER) and ``cloud-serve`` (ROUTER). Version 2.

Every message is a ZeroMQ multipart message (the ROUTER sees the DEALER's identity
frame first; it is not part of the protocol)::

    frame 0   header:  b"SPLE" | u8 protocol version | u8 message type | UTF-8 JSON object
    frame 1.. payload frames, raw bytes, sent zero-copy (codec payloads, labels, weights)

The header is at most :data:`MAX_HEADER_BYTES`; its JSON holds only numbers,
strings, booleans, lists and objects. Numbers are finite (no ``NaN``/``Infinity``, no
overflow to infinity) and integers lie within +-(2**53 - 1), the range every JSON
reader holds exactly (RFC 7493). Nothing is ever unpickled: payload frames are
codec payloads (self-describing, CRC-checked, see :mod:`splitedge.codecs`) or raw
little-endian arrays whose dtype and shape the header states and the receiver
checks against what it expects.

Requests and replies: every request (edge->cloud) carries ``id``, an integer
unique among the requests of one connection (a retry of a request is sent again with the
same ``id``); every reply, ERROR included, carries ``reply_to``, the ``id`` of the request it
answers (``null`` on an ERROR about a message whose id could not be read), as
jupyter_client's ``msg_id``/``parent_header`` do. The edge takes as the answer to its
request the first reply whose ``reply_to`` is that request's id (or an ERROR whose
``reply_to`` is ``null``) and drops every other message; ``step`` is never used to match
replies, only to apply each train step once. The builders below (:func:`hello`,
:func:`train`, :func:`grad`, ...) are the one way to make each message.

Message types (header fields; ``frames`` is the number of payload frames):

===========  ====  ===========  =========================================================  ======
type         id    direction    header                                                     frames
===========  ====  ===========  =========================================================  ======
HELLO        1     edge->cloud  id, client_id, num_clients, model, cut, activation_shape,  0
                                input_shape, num_classes, samples, resume_step, planned_steps,
                                [partition {plan, digest, numpy}: see runtime_edge.data.
                                partition_fingerprint; edges with one plan must agree],
                                [fresh: true for a run's first HELLO without --resume:
                                refused (client_id_taken) if the id already has steps],
                                [client_files: export.manifest.client_digest of the edge half]
WELCOME      2     cloud->edge  reply_to, session, codec {name, params}, grad_codec        0
                                {name, params}, fedavg_every, last_step (steps already
                                applied for this client id), server_step, [client_files: the
                                cloud's artifacts' client_digest; each side warns if they differ]
TRAIN        3     edge->cloud  id, step, n, round, total_rounds, encode_ms                2: activation payload,
                                                                                           labels int64[n]
GRAD         4     cloud->edge  reply_to, step, loss, correct, fedavg_round (or null),     1: gradient payload
                                timings
EVAL         5     edge->cloud  id, n, has_labels                                          1-2: activation payload
                                                                                           [, labels int64[n]]
EVAL_RESULT  6     cloud->edge  reply_to, n, loss_sum (null without labels)                1: predictions int64[n]
WEIGHTS      7     edge->cloud  id, round, samples, names, shapes                          one float32 array per name
WEIGHTS_AVG  8     cloud->edge  reply_to, round, names, shapes, clients                    one float32 array per name
ERROR        9     cloud->edge  reply_to (or null), code, message, [step, expected_step]   0
BYE          10    edge->cloud  id, reason ("interrupted": the edge stopped and may         0
                                --resume: its place is freed, its progress kept, no
                                BYE_ACK), steps
BYE_ACK      11    cloud->edge  reply_to                                                   0
PING         12    edge->cloud  id, t                                                      0
PONG         13    cloud->edge  reply_to, t                                                0
===========  ====  ===========  =========================================================  ======

Versions: a message of another protocol version is refused as a whole (:class:`VersionError`).
The cloud answers a version-1 peer with an ERROR ``unsupported_version`` framed as version 1
(whose ERROR is the same ``code``/``message`` object), so an old edge can say why; the edge
stops at once with a clear message when the cloud speaks another version.

Step ids: ``step`` counts a client's train steps from 1. The cloud applies step s of
client c at most once: a retry of the step it applied last is answered from a cache
of its reply, an older step gets ``ERROR stale_step`` with ``expected_step``, so a
retried step is never applied twice. Client ids (``client_id``) are stable across
reconnects and restarts; ZeroMQ identities are not. With CurveZMQ on, the cloud binds a
client id to the first key that says HELLO as it (``ERROR client_id_taken`` for any other).
A ``fresh`` HELLO for a client id that already has steps applied is refused the same way
(the new run would skip those batches and count them as its own) and leaves the cloud's
state untouched.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

PROTOCOL_VERSION = 2
MAGIC = b"SPLE"
_PREFIX = struct.Struct("<4sBB")
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_INT = 2**53 - 1


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    TRAIN = 3
    GRAD = 4
    EVAL = 5
    EVAL_RESULT = 6
    WEIGHTS = 7
    WEIGHTS_AVG = 8
    ERROR = 9
    BYE = 10
    BYE_ACK = 11
    PING = 12
    PONG = 13


class ErrorCode:
    BAD_MESSAGE = "bad_message"  # not a protocol message, or a header that fails its schema
    BAD_PAYLOAD = "bad_payload"  # a codec payload that does not decode
    SHAPE_MISMATCH = "shape_mismatch"  # decodes, but not to the shape the manifest says
    NOT_FINITE = "not_finite"  # NaN or Inf where numbers must be finite
    UNKNOWN_CLIENT = "unknown_client"  # no HELLO from this connection (e.g. the cloud restarted)
    STALE_STEP = "stale_step"  # a step older than the last one applied
    INCOMPATIBLE = "incompatible"  # HELLO for different artifacts than the cloud serves
    UNEXPECTED = "unexpected"  # a valid message that this side does not accept here
    INTERNAL = "internal"  # a bug: reported, logged, the server keeps serving
    TOO_MANY_ERRORS = "too_many_errors"  # the client is disconnected
    SERVER_FULL = "server_full"  # --max-clients clients are being served: HELLO refused, try later
    CLIENT_ID_TAKEN = "client_id_taken"  # with CURVE: the client id (or routing identity) belongs to another key
    UNSUPPORTED_VERSION = "unsupported_version"  # a message of another protocol version


class ProtocolError(ValueError):
    """A message that is not valid protocol; ``code`` is an :class:`ErrorCode`. ``reply_to`` is the
    request id of the message it is about, where that could be read (None otherwise)."""

    def __init__(self, message: str, code: str = ErrorCode.BAD_MESSAGE, reply_to: int | None = None):
        super().__init__(message)
        self.code = code
        self.reply_to = reply_to


class VersionError(ProtocolError):
    """A message framed with another protocol version (``version``) than :data:`PROTOCOL_VERSION`."""

    def __init__(self, version: int):
        super().__init__(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
                         ErrorCode.UNSUPPORTED_VERSION)
        self.version = version


# Header schemas: required field -> accepted types. Extra fields are allowed (forward compatible).
_NUM = (int, float)
_OPT_INT = (int, type(None))
SCHEMAS: dict[MsgType, dict[str, tuple[type, ...]]] = {
    MsgType.HELLO: {
        "id": (int,), "client_id": (int,), "num_clients": (int,), "model": (str,), "cut": (int,),
        "activation_shape": (list,), "input_shape": (list,), "num_classes": (int,),
        "samples": (int,), "resume_step": (int,), "planned_steps": (int,),
    },
    MsgType.WELCOME: {
        "reply_to": (int,), "session": (str,), "codec": (dict,), "grad_codec": (dict,), "fedavg_every": (int,),
        "last_step": (int,), "server_step": (int,),
    },
    MsgType.TRAIN: {"id": (int,), "step": (int,), "n": (int,), "round": (int,), "total_rounds": (int,), "encode_ms": _NUM},
    MsgType.GRAD: {"reply_to": (int,), "step": (int,), "loss": _NUM, "correct": (int,), "fedavg_round": _OPT_INT, "timings": (dict,)},
    MsgType.EVAL: {"id": (int,), "n": (int,), "has_labels": (bool,)},
    MsgType.EVAL_RESULT: {"reply_to": (int,), "n": (int,), "loss_sum": (float, int, type(None))},
    MsgType.WEIGHTS: {"id": (int,), "round": (int,), "samples": (int,), "names": (list,), "shapes": (list,)},
    MsgType.WEIGHTS_AVG: {"reply_to": (int,), "round": (int,), "names": (list,), "shapes": (list,), "clients": (int,)},
    MsgType.ERROR: {"reply_to": _OPT_INT, "code": (str,), "message": (str,)},
    MsgType.BYE: {"id": (int,), "reason": (str,), "steps": (int,)},
    MsgType.BYE_ACK: {"reply_to": (int,)},
    MsgType.PING: {"id": (int,), "t": _NUM},
    MsgType.PONG: {"reply_to": (int,), "t": _NUM},
}
REQUESTS = frozenset(t for t, schema in SCHEMAS.items() if "id" in schema)  # edge->cloud, answered by one reply


@dataclass
class Message:
    type: MsgType
    header: dict[str, Any] = field(default_factory=dict)
    frames: list[Any] = field(default_factory=list)  # bytes-like (bytes, memoryview, zmq.Frame)
    nbytes: int = 0  # size of all frames on the wire, header included (set by unpack)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (tuple, np.ndarray)):
        return list(o.tolist() if isinstance(o, np.ndarray) else o)
    raise TypeError(f"not JSON-serialisable in a header: {type(o).__name__}")


def encode_header(type_: MsgType, header: dict[str, Any]) -> bytes:
    body = json.dumps(header, separators=(",", ":"), default=_json_default, allow_nan=False).encode()
    if len(body) + _PREFIX.size > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {type_.name} is {len(body)} bytes, over {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, int(type_)) + body


def pack(type_: MsgType, header: dict[str, Any] | None = None, frames: list[Any] | None = None) -> list[Any]:
    """The frames of one message, ready for ``socket.send_multipart(..., copy=False)``."""
    return [encode_header(type_, header or {}), *(frames or [])]


def pack_message(msg: Message) -> list[Any]:
    return pack(msg.type, msg.header, msg.frames)


def pack_request(msg: Message, request_id: int) -> list[Any]:
    """Request ``msg`` (built without an id) as request ``request_id``."""
    return pack(msg.type, {"id": request_id, **msg.header}, msg.frames)


def pack_version_error(version: int, message: str) -> list[Any] | None:
    """An ERROR ``unsupported_version`` framed as protocol ``version`` speaks it, for a peer of that version;
    None for a version whose ERROR layout this side does not know (only version 1's is known)."""
    if version != 1:
        return None
    body = json.dumps({"code": ErrorCode.UNSUPPORTED_VERSION, "message": message, "re": None, "step": None},
                      separators=(",", ":")).encode()
    return [_PREFIX.pack(MAGIC, 1, int(MsgType.ERROR)) + body]


def _frame_bytes(f: Any) -> memoryview:
    if hasattr(f, "buffer"):  # zmq.Frame
        return f.buffer
    return memoryview(f)


def _header_int(text: str) -> int:
    # a header int must fit in a double exactly; the length check comes first, before int()
    if len(text.lstrip("-")) > 16 or abs(v := int(text)) > MAX_HEADER_INT:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside +-(2**53 - 1)")
    return v


def _header_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:24]} is not a finite double")
    return v


def _header_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def unpack(frames: list[Any]) -> Message:
    """Parses and validates one message. Raises :class:`ProtocolError` naming what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    head = _frame_bytes(frames[0])
    if len(head) < _PREFIX.size:
        raise ProtocolError(f"header frame of {len(head)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(head)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    magic, version, type_id = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not a splitedge message")
    if version != PROTOCOL_VERSION:
        raise VersionError(version)
    try:
        type_ = MsgType(type_id)
    except ValueError:
        raise ProtocolError(f"unknown message type {type_id}") from None
    try:
        header = json.loads(bytes(head[_PREFIX.size :]).decode("utf-8"), parse_int=_header_int,
                            parse_float=_header_float, parse_constant=_header_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ProtocolError(f"{type_.name} header is not valid UTF-8 JSON: {what}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{type_.name} header must be a JSON object")
    rid = header.get("id")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else None  # for the ERROR that answers it
    for key, types in SCHEMAS[type_].items():
        if key not in header:
            raise ProtocolError(f"{type_.name} header lacks field {key!r}", reply_to=rid)
        val = header[key]
        if not isinstance(val, types) or (isinstance(val, bool) and bool not in types):
            raise ProtocolError(
                f"{type_.name} field {key!r} must be {'/'.join(t.__name__ for t in types)}, got {type(val).__name__}",
                reply_to=rid,
            )
    nbytes = len(head) + sum(len(_frame_bytes(f)) for f in frames[1:])
    return Message(type_, header, list(frames[1:]), nbytes)


def printable(text: Any, limit: int = 1000) -> str:
    """``text`` fit for a log line or a terminal: at most ``limit`` characters (then "..."), and every
    control or format character (ESC, CR, BEL, bidi overrides) escaped as ``\\x1b``, ``\\u202e``, ... --
    a peer's text must never move the cursor, retitle the window or hide what follows."""
    s = str(text)
    cut = len(s) > limit
    s = s[:limit]
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s + ("..." if cut else "")


def expect_frames(msg: Message, count: int | tuple[int, int]) -> None:
    lo, hi = (count, count) if isinstance(count, int) else count
    if not lo <= len(msg.frames) <= hi:
        want = str(lo) if lo == hi else f"{lo}-{hi}"
        raise ProtocolError(f"{msg.type.name} carries {len(msg.frames)} payload frames, expected {want}")


# ----------------------------------------------------------------------------- raw arrays


def array_frame(a: np.ndarray, dtype: str) -> memoryview:
    """A C-contiguous little-endian array as a zero-copy frame."""
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return a.data.cast("B")


def read_array(frame: Any, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Reads a raw little-endian array of a known dtype and shape, checking the size first."""
    buf = _frame_bytes(frame)
    dt = np.dtype(dtype).newbyteorder("<")
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise ProtocolError(f"{what}: impossible shape {shape}")
        n *= d
    if len(buf) != n * dt.itemsize:
        raise ProtocolError(f"{what}: {len(buf)} bytes, expected {n * dt.itemsize} for {dtype}{list(shape)}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def read_labels(frame: Any, n: int, num_classes: int) -> np.ndarray:
    y = read_array(frame, "int64", (n,), "labels")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ProtocolError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    return y


def check_shapes(names: list, shapes: list, expected: dict[str, tuple[int, ...]], what: str) -> list[tuple[int, ...]]:
    """Validates a WEIGHTS header's names/shapes against the known parameters."""
    if len(names) != len(shapes):
        raise ProtocolError(f"{what}: {len(names)} names but {len(shapes)} shapes")
    out = []
    for name, shape in zip(names, shapes):
        if not isinstance(name, str) or name not in expected:
            raise ProtocolError(f"{what}: unknown parameter {name!r}")
        if not isinstance(shape, list) or tuple(shape) != tuple(expected[name]):
            raise ProtocolError(f"{what}: parameter {name} has shape {shape}, expected {list(expected[name])}")
        out.append(tuple(shape))
    return out


# ----------------------------------------------------------------------------- message builders
# One function per message type. Requests are built without ``id`` (the edge's channel numbers
# them as it sends); replies take the ``reply_to`` of the request they answer.


def _msg(type_: MsgType, frames: list[Any] | None = None, **header: Any) -> Message:
    return Message(type_, {k: v for k, v in header.items() if v is not _ABSENT}, list(frames or []))


_ABSENT: Any = object()  # an optional header field left out


def hello(*, client_id: int, num_clients: int, model: str, cut: int, activation_shape: Any, input_shape: Any,
          num_classes: int, samples: int, resume_step: int, planned_steps: int, partition: Any = _ABSENT,
          fresh: Any = _ABSENT, client_files: Any = _ABSENT) -> Message:
    return _msg(MsgType.HELLO, client_id=client_id, num_clients=num_clients, model=model, cut=cut,
                activation_shape=list(activation_shape), input_shape=list(input_shape), num_classes=num_classes,
                samples=samples, resume_step=resume_step, planned_steps=planned_steps, partition=partition,
                fresh=fresh, client_files=client_files)


def welcome(reply_to: int, *, session: str, codec: dict, grad_codec: dict, fedavg_every: int, last_step: int,
            server_step: int, client_files: Any = _ABSENT) -> Message:
    return _msg(MsgType.WELCOME, reply_to=reply_to, session=session, codec=codec, grad_codec=grad_codec,
                fedavg_every=fedavg_every, last_step=last_step, server_step=server_step, client_files=client_files)


def train(*, step: int, n: int, total_rounds: int, encode_ms: float, activation: Any, labels: np.ndarray) -> Message:
    return _msg(MsgType.TRAIN, [activation, array_frame(labels, "int64")], step=step, n=n, round=step,
                total_rounds=total_rounds, encode_ms=encode_ms)


def grad(reply_to: int, *, step: int, loss: float, correct: int, fedavg_round: int | None, timings: dict,
         gradient: Any) -> Message:
    return _msg(MsgType.GRAD, [gradient], reply_to=reply_to, step=step, loss=loss, correct=correct,
                fedavg_round=fedavg_round, timings=timings)


def eval_request(*, activation: Any, labels: np.ndarray | None, n: int) -> Message:
    frames = [activation] + ([array_frame(labels, "int64")] if labels is not None else [])
    return _msg(MsgType.EVAL, frames, n=n, has_labels=labels is not None)


def eval_result(reply_to: int, *, n: int, loss_sum: float | None, predictions: np.ndarray) -> Message:
    return _msg(MsgType.EVAL_RESULT, [array_frame(predictions, "int64")], reply_to=reply_to, n=n, loss_sum=loss_sum)


def weights(*, rnd: int, samples: int, params: dict[str, np.ndarray]) -> Message:
    names = sorted(params)
    return _msg(MsgType.WEIGHTS, [array_frame(params[k], "float32") for k in names], round=rnd, samples=samples,
                names=names, shapes=[list(params[k].shape) for k in names])


def weights_avg(reply_to: int, *, rnd: int, params: dict[str, np.ndarray], clients: int) -> Message:
    names = sorted(params)
    return _msg(MsgType.WEIGHTS_AVG, [array_frame(params[k], "float32") for k in names], reply_to=reply_to,
                round=rnd, names=names, shapes=[list(params[k].shape) for k in names], clients=clients)


def error(reply_to: int | None, *, code: str, message: str, **extra: Any) -> Message:
    """ERROR answering request ``reply_to``; ``extra``: ``step``, ``expected_step``."""
    return _msg(MsgType.ERROR, reply_to=reply_to, code=code, message=message, **extra)


def bye(*, reason: str, steps: int) -> Message:
    return _msg(MsgType.BYE, reason=reason, steps=steps)


def bye_ack(reply_to: int) -> Message:
    return _msg(MsgType.BYE_ACK, reply_to=reply_to)


def ping(*, t: float) -> Message:
    return _msg(MsgType.PING, t=t)


def pong(reply_to: int, *, t: float) -> Message:
    return _msg(MsgType.PONG, reply_to=reply_to, t=t)
