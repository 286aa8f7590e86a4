"""``cloud-serve``'s engine: one ROUTER socket, one shared server model, many edge clients.

Messages are handled one at a time in arrival order (the server model is shared,
so its steps are sequential anyway). Anything wrong with one message -- a garbage
frame, a payload that does not decode, a wrong shape, NaN, a step out of order --
is answered with an ERROR message to that client, logged and counted in the
metrics; the server keeps serving everyone else. See :mod:`splitedge.wire.protocol`
for the messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from .. import codecs as sc
from ..wire import protocol as P
from ..wire import security
from ..export import manifest as mf
from ..fsutil import CheckpointDir
from ..wire.transport import DEFAULT_MAX_MESSAGE_BYTES, frame_len, server_socket
from .fedavg import FedAvgRounds, client_param_shapes
from .metrics import Metrics
from .state import Checkpointing
from .trainer import ServerModel, StepRefused

if TYPE_CHECKING:
    from .status import StatusBoard, StatusServer
    from .tb_scalars import TensorBoardSink

log = logging.getLogger("cloud-serve")

MAX_ERROR_MESSAGE = 1000  # characters of an ERROR message (at most 6 bytes each in JSON: far below the header limit)


@dataclass
class ServeConfig:
    artifacts: str
    bind: str = "tcp://127.0.0.1:5555"
    codec: sc.CodecSpec = sc.CodecSpec("sgq")
    grad_codec: sc.CodecSpec | None = None  # None: the forward codec with the same settings
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    device: str = "cpu"
    fedavg_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    # optimizer settings given on the command line: on --resume they replace the checkpoint's
    # (the others come from the checkpoint, like the optimizer's state)
    hparams_given: tuple[str, ...] = ("lr", "momentum", "weight_decay")
    metrics: str | None = None
    client_timeout_s: float = 60.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_client_errors: int = 20  # bad messages from one client within error_window_s before it is dropped
    error_window_s: float = 60.0
    max_clients: int = 256  # clients served at once (not done, not timed out)
    expect_clients: int = 0
    exit_when_done: bool = False
    log_every: int = 50
    seed: int = 0
    curve_secret: str | None = None  # the cloud's .key_secret (CurveZMQ); with authorized_clients
    authorized_clients: str | None = None  # directory of the admitted edges' public .key files
    status: str | None = None  # ADDR:PORT of the live status page (runtime_cloud/status.py)
    tensorboard: str | None = None  # directory of TensorBoard scalars


@dataclass
class Session:
    client_id: int
    identity: bytes
    fwd: Any  # the forward codec (cloud side: its backward rule)
    grad: Any  # the gradient codec (one stream per client)
    samples: int = 0
    last_step: int = 0
    steps: int = 0
    cached: tuple[int, P.Message] | None = None  # (step, its GRAD), sent again to a retry of that step
    last_seen: float = field(default_factory=time.monotonic)
    done: bool = False
    timed_out: bool = False
    stopped_at: float | None = None  # when it said BYE "interrupted" (it may --resume)
    planned_steps: int = P.MAX_HEADER_INT - 1  # HELLO's: no step id beyond it is accepted
    errors: deque = field(default_factory=deque)  # times of recent bad messages
    fedavg_round: int = 0  # the last FedAvg round this client sent weights for
    weights_id: int | None = None  # the request id of those WEIGHTS (its WEIGHTS_AVG answers it)
    bytes_in: int = 0
    bytes_out: int = 0
    key: str | None = None  # the edge's CurveZMQ public key (Z85) when CURVE is on

    @property
    def active(self) -> bool:
        return not self.done and not self.timed_out


class CloudServer(Checkpointing):
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.manifest = mf.load(cfg.artifacts)
        self.client_files = mf.client_digest(self.manifest)  # the edge half's export, compared at each HELLO
        # settings are validated once here, so a bad --codec fails at start, not at the first client
        cfg.codec.build()
        self.grad_spec.build()
        self.model = ServerModel(
            cfg.artifacts, self.manifest, optimizer=cfg.optimizer, lr=cfg.lr,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, device=cfg.device,
        )
        self.client_param_shapes = client_param_shapes(self.manifest)
        self.sessions: dict[bytes, Session] = {}
        self.by_client: dict[int, Session] = {}
        self.progress: dict[int, dict[str, Any]] = {}  # client_id -> {last_step, done[, key]}; persisted
        self.fedavg = FedAvgRounds(self.client_param_shapes, cfg.expect_clients, cfg.client_timeout_s)
        self.server_step = 0
        self.session_id = uuid.uuid4().hex[:12]
        self.metrics = Metrics(cfg.metrics)
        self.status_board: StatusBoard | None = None
        self.status_server: StatusServer | None = None
        self.tensorboard: TensorBoardSink | None = None
        self._status_synced = 0.0
        self.ckpt = CheckpointDir(cfg.checkpoint_dir, keep=cfg.keep_checkpoints) if cfg.checkpoint_dir else None
        self._stop = False
        self._last_ckpt_step = 0
        self.errors_total = 0
        self._current_key: str | None = None  # the authenticated key of the message being handled
        self.partitions: dict[str, tuple[str, int, str]] = {}  # partition plan -> (digest, first client, its numpy)
        if cfg.resume:
            self._resume()
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.auth = None
        curve = None
        if cfg.curve_secret or cfg.authorized_clients:
            if not (cfg.curve_secret and cfg.authorized_clients):
                raise ValueError("--curve-secret and --authorized-clients go together")
            curve = security.server_config(cfg.curve_secret, cfg.authorized_clients)
            self.auth = security.start_authenticator(self.ctx, curve)
        elif not security.is_loopback_endpoint(cfg.bind):
            log.warning(
                "listening on %s WITHOUT encryption or authentication: anyone who can reach this port can join the "
                "training, read activations and gradients, and send messages. Fine on a trusted lab network; "
                "otherwise create keys with `splitedge keys generate` and pass --curve-secret/--authorized-clients.",
                cfg.bind,
            )
        self.ep = server_socket(self.ctx, cfg.bind, max_message_bytes=cfg.max_message_bytes, curve=curve)
        if cfg.status or cfg.tensorboard:
            try:
                self._start_observers()
            except BaseException:
                self.ep.close(linger_ms=0)
                raise

    def _start_observers(self) -> None:
        """The live status page (--status) and TensorBoard scalars (--tensorboard): fed by the metrics events."""
        if self.cfg.tensorboard:
            from .tb_scalars import TensorBoardSink

            self.tensorboard = TensorBoardSink(self.cfg.tensorboard)
            self.metrics.observers.append(self.tensorboard.observe)
            log.info("TensorBoard scalars in %s (tensorboard --logdir %s)", self.cfg.tensorboard, self.cfg.tensorboard)
        if self.cfg.status:
            from . import status

            host, port = status.parse_address(self.cfg.status)
            self.status_board = status.StatusBoard(stall_s=min(status.STALL_S, self.cfg.client_timeout_s / 2))
            try:
                self.status_server = status.StatusServer(self.status_board, host, port)
            except OSError as e:
                raise OSError(e.errno, f"--status {self.cfg.status}: cannot serve the status page there: "
                                       f"{e.strerror or e}") from None
            self.metrics.observers.append(self.status_board.observe)
            if not status.is_loopback(host):
                log.warning("status page on %s, beyond loopback: plain HTTP, readable by anyone who can reach it "
                            "(read-only; it shows client ids, losses and traffic)", self.status_server.url)
            elif self.auth is not None:
                log.info("status page on %s (loopback only, although the training traffic is encrypted: the page "
                         "is plain HTTP; give --status 0.0.0.0:PORT to serve it beyond this machine)",
                         self.status_server.url)
            else:
                log.info("status page on %s", self.status_server.url)

    def _sync_status(self, now: float) -> None:
        """The sessions' liveness for the status page, at most twice a second."""
        if self.status_board is None or now - self._status_synced < 0.5:
            return
        self._status_synced = now
        owed = self.fedavg.waiting()
        self.status_board.sync([
            (s.client_id, now - s.last_seen, s.active, s.timed_out,
             (s.active and s.client_id in owed) or
             (s.timed_out and s.stopped_at is not None and now - s.stopped_at < self.cfg.client_timeout_s))
            for s in self.by_client.values()
        ])

    # ------------------------------------------------------------------ settings

    @property
    def grad_spec(self) -> sc.CodecSpec:
        return self.cfg.grad_codec or self.cfg.codec

    def codec_settings(self) -> dict[str, Any]:
        """WELCOME's (and the checkpoint's) ``codec`` and ``grad_codec``: every setting spelled out."""
        return {"codec": self.cfg.codec.resolved().to_json(), "grad_codec": self.grad_spec.resolved().to_json()}

    # ------------------------------------------------------------------ main loop

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (tests)
                signal.signal(sig, self.stop)
        s = self.codec_settings()
        log.info(
            "serving %s cut %d (activation %s) on %s%s; codec %s %s, gradients %s %s; server %s %s",
            self.manifest.model, self.manifest.cut, "x".join(map(str, self.manifest.activation_shape)), self.cfg.bind,
            " (CURVE: encrypted, authorized keys only)" if self.auth is not None else "", s["codec"]["name"], s["codec"]["params"], s["grad_codec"]["name"], s["grad_codec"]["params"],
            self.cfg.optimizer, ", ".join(f"{k} {v:g}" for k, v in self.model.hparams.items()),
        )
        self.metrics.write("start", session=self.session_id, bind=self.cfg.bind, **s,
                           model=self.manifest.model, cut=self.manifest.cut, server_step=self.server_step)
        rc = 0
        try:
            while not self._stop:
                got = self.ep.recv(timeout_ms=100)
                if got is not None:
                    identity, frames = got
                    assert identity is not None  # a ROUTER socket names the sender
                    self._dispatch(identity, frames)
                self._housekeeping()
        finally:
            rc = self._shutdown()
        return rc

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._sync_status(now)
        for s in list(self.by_client.values()):
            if s.active and now - s.last_seen > self.cfg.client_timeout_s:
                s.timed_out = True
                log.warning("client %d silent for %.0fs: timed out (the others go on)", s.client_id, now - s.last_seen)
                self.metrics.write("client_timeout", client=s.client_id, last_step=s.last_step)
                self._complete_rounds()
        if self.fedavg.pending:  # rounds that were waiting for clients to join may be due
            self._complete_rounds()
        if self.ckpt and self.server_step - self._last_ckpt_step >= self.cfg.checkpoint_every:
            # a failure is logged and in the metrics; the previous checkpoint is intact: keep training, retry later
            with contextlib.suppress(OSError):
                self._checkpoint()
        if self.cfg.exit_when_done and self.cfg.expect_clients:
            done = sum(1 for s in self.by_client.values() if s.done)
            gone = sum(1 for s in self.by_client.values() if s.timed_out)
            # an interrupted client gets --client-timeout to come back, as a silent one does
            returning = any(s.timed_out and s.stopped_at is not None and now - s.stopped_at < self.cfg.client_timeout_s
                            for s in self.by_client.values())
            if done + gone >= self.cfg.expect_clients and not returning and \
                    not any(s.active for s in self.by_client.values()):
                log.info("all %d expected clients finished (%d of them timed out)", done + gone, gone)
                self._stop = True

    def _shutdown(self) -> int:
        rc = 0
        if self.ckpt:
            try:
                self._checkpoint()
            except OSError as e:
                log.error("final checkpoint failed: %s (the previous one in %s is intact)", e, self.cfg.checkpoint_dir)
                rc = 1
        self.metrics.write("stop", server_step=self.server_step, errors=self.errors_total,
                           bytes_in=self.ep.counters.bytes_in, bytes_out=self.ep.counters.bytes_out)
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.status_server is not None:
            self.status_server.close()
        self.ep.close(linger_ms=500)
        if self.auth is not None:
            self.auth.stop()
        log.info("stopped after %d server steps", self.server_step)
        return rc

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        msg = None
        key = self._peer_key(frames)
        session = self.sessions.get(identity)
        if session is not None and session.key is not None and key != session.key:
            # another key on a routing identity whose session belongs to a different edge (possible once
            # that edge has disconnected): never let it act for that session, nor count errors against it
            self.errors_total += 1
            log.warning("a peer with another CurveZMQ key uses the routing identity of client %d: refused",
                        session.client_id)
            self.metrics.write("error", client=None, code=P.ErrorCode.CLIENT_ID_TAKEN, step=None,
                               message=f"routing identity of client {session.client_id} used with another key")
            self._send_raw(identity, P.error(
                None, code=P.ErrorCode.CLIENT_ID_TAKEN, step=None,
                message="this connection's identity belongs to another edge's key; reconnect with a new identity"))
            return
        self._current_key = key
        if session is not None and session.active:
            # a closed session (BYE, timed out) is not revived by a message: its requests are refused
            # (unknown_client) and its HELLO again meets --max-clients like any other
            session.last_seen = time.monotonic()
        try:
            msg = P.unpack(frames)
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise P.ProtocolError(f"{msg.type.name} is not a message the cloud accepts", P.ErrorCode.UNEXPECTED)
            handler(self, identity, msg)
        except P.VersionError as e:
            # said in the peer's own version where this side knows its ERROR, so an older edge can tell why
            old = P.pack_version_error(e.version, f"this cloud speaks splitedge protocol version "
                                       f"{P.PROTOCOL_VERSION}, the message is version {e.version}: run one "
                                       "splitedge release on both sides")
            if old is None:
                self._reject(identity, e.code, str(e), None)
            else:
                self.errors_total += 1
                log.warning("refused a message of protocol version %d from %r", e.version, identity[:16])
                self.ep.send(old, identity)
        except P.ProtocolError as e:
            self._reject(identity, e.code, str(e), msg, reply_to=e.reply_to)
        except sc.PayloadError as e:
            self._reject(identity, P.ErrorCode.BAD_PAYLOAD, f"payload does not decode: {e}", msg)
        except Exception as e:  # noqa: BLE001 - one bad message must never stop the server
            log.exception("internal error handling a message from %r", identity)
            self._reject(identity, P.ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}", msg)
        session = self.sessions.get(identity)
        if session is not None and session.active:  # the time the server took over its message is not its silence
            session.last_seen = time.monotonic()

    def _reject(self, identity: bytes, code: str, message: str, msg: P.Message | None, *,
                reply_to: int | None = None, **extra: Any) -> None:
        self.errors_total += 1
        session = self.sessions.get(identity)
        cid = session.client_id if session else None
        # the reply must always fit in a header: messages quote what the client sent, so cap them,
        # and echo the step only when it is a step id
        # and escape control characters (they reach logs and terminals on both sides)
        message = P.printable(message, MAX_ERROR_MESSAGE)
        step = msg.header.get("step") if msg is not None else None
        if not isinstance(step, int) or isinstance(step, bool):
            step = None
        log.warning("error to client %s: %s: %s", cid if cid is not None else repr(identity[:16]), code, message)
        self.metrics.write("error", client=cid, code=code, message=message[:500], step=step)
        if msg is not None:  # which request this answers
            reply_to = msg.header.get("id")
        self._send(identity, P.error(reply_to, code=code, message=message, step=step, **extra))
        if session is not None and code not in (P.ErrorCode.STALE_STEP,):
            now = time.monotonic()
            session.errors.append(now)
            while session.errors and now - session.errors[0] > self.cfg.error_window_s:
                session.errors.popleft()
            if len(session.errors) > self.cfg.max_client_errors:
                log.warning("client %d sent %d bad messages within %.0fs: disconnected", session.client_id,
                            len(session.errors), self.cfg.error_window_s)
                self.metrics.write("client_dropped", client=session.client_id, errors=len(session.errors))
                self._send(identity, P.error(reply_to, code=P.ErrorCode.TOO_MANY_ERRORS,
                                             message="too many bad messages; say HELLO again"))
                self._forget(session)

    def _peer_key(self, frames: list[Any]) -> str | None:
        """The CurveZMQ public key (Z85) that the ZAP handler authenticated for this message; None without CURVE."""
        if self.auth is None or not frames:
            return None
        try:
            return frames[0].get("User-Id")
        except (AttributeError, zmq.ZMQError, UnicodeDecodeError):
            return None

    def _send_raw(self, identity: bytes, msg: P.Message) -> None:
        self.ep.send(P.pack_message(msg), identity)

    def _send(self, identity: bytes, msg: P.Message) -> list:
        out = P.pack_message(msg)
        n = self.ep.send(out, identity)
        s = self.sessions.get(identity)
        if s is not None:
            s.bytes_out += n
        return out

    def _session(self, identity: bytes) -> Session:
        """The active session of this connection; unknown_client if there is none, or it is closed."""
        s = self.sessions.get(identity)
        if s is None:
            raise P.ProtocolError("no HELLO from this connection (did the cloud restart?); say HELLO again",
                                  P.ErrorCode.UNKNOWN_CLIENT)
        if not s.active:
            why = "said BYE" if s.done else "stopped (BYE interrupted)" if s.stopped_at is not None else \
                f"was timed out after {self.cfg.client_timeout_s:g}s of silence (--client-timeout)"
            raise P.ProtocolError(f"client {s.client_id} {why}: its session is closed; say HELLO again",
                                  P.ErrorCode.UNKNOWN_CLIENT)
        return s

    def _forget(self, s: Session) -> None:
        self.sessions.pop(s.identity, None)
        if self.by_client.get(s.client_id) is s:
            del self.by_client[s.client_id]
        self._complete_rounds()

    # ------------------------------------------------------------------ handlers

    def _on_hello(self, identity: bytes, msg: P.Message) -> None:
        h = msg.header
        m = self.manifest
        _check_hello(h)
        mismatch = [
            f"{k} {h[k]} != {v}" for k, v in (
                ("model", m.model), ("cut", m.cut), ("activation_shape", list(m.activation_shape)),
                ("input_shape", list(m.input_shape)), ("num_classes", m.num_classes),
            ) if h[k] != v
        ]
        if mismatch:
            raise P.ProtocolError("artifacts differ from the cloud's: " + "; ".join(mismatch), P.ErrorCode.INCOMPATIBLE)
        cid = h["client_id"]
        if cid < 0:
            raise P.ProtocolError(f"client_id must be >= 0, got {cid}")
        key = self._current_key
        bound = self.progress.get(cid, {}).get("key")
        if key is not None and bound is not None and bound != key:
            raise P.ProtocolError(
                f"client_id {cid} belongs to another edge's CurveZMQ key in this run; give this edge its own "
                "--client-id", P.ErrorCode.CLIENT_ID_TAKEN)
        self._check_partition(cid, h.get("partition"))
        old = self.by_client.get(cid)
        applied = int(self.progress.get(cid, {}).get("last_step", old.last_step if old else 0))
        if h.get("fresh") is True and applied > 0:
            # refused before any session state changes: the earlier run with this id can still --resume
            raise P.ProtocolError(
                f"this cloud has already applied {applied} steps from --client-id {cid} (an earlier run with this id); "
                "a run without --resume would start from the initial weights and skip them. Continue that run with "
                "--resume and its --checkpoint-dir, give this run another --client-id, or start a fresh cloud-serve",
                P.ErrorCode.CLIENT_ID_TAKEN)
        if old is None or not old.active:
            active = sum(1 for x in self.by_client.values() if x.active)
            if active >= self.cfg.max_clients:
                raise P.ProtocolError(f"the cloud serves at most {self.cfg.max_clients} clients at once (--max-clients) "
                                      "and is full", P.ErrorCode.SERVER_FULL)
        if old is not None and old.identity != identity:
            self.sessions.pop(old.identity, None)
        fwd = self.cfg.codec.build()
        grad = self.grad_spec.build()
        s = Session(cid, identity, fwd, grad, samples=h["samples"], key=key, planned_steps=h["planned_steps"])
        s.last_step = applied
        s.bytes_in = msg.nbytes
        self.sessions[identity] = s
        self.by_client[cid] = s
        self.progress[cid] = self._progress_entry(s, done=False)
        log.info("client %d joined (%d samples, its step %d, applied here %d)", cid, s.samples, h["resume_step"], s.last_step)
        self.metrics.write("client_joined", client=cid, samples=s.samples, last_step=s.last_step,
                           resume_step=h["resume_step"], planned_steps=h["planned_steps"])
        theirs = h.get("client_files")
        if isinstance(theirs, str) and theirs != self.client_files:
            log.warning("client %d trains the edge half of another export of %s cut %d (its client/ files differ "
                        "from these artifacts'): fine if it was re-exported on purpose; otherwise the two halves do "
                        "not start from one model", cid, m.model, m.cut)
            self.metrics.write("artifacts_differ", client=cid)
        self._send(identity, P.welcome(
            h["id"], session=self.session_id, **self.codec_settings(), fedavg_every=self.cfg.fedavg_every,
            last_step=s.last_step, server_step=self.server_step, client_files=self.client_files))

    def _check_partition(self, cid: int, info: Any) -> None:
        """Edges that partition the same data with the same scheme and seed must agree on the shards
        (HELLO's optional ``partition``: plan, digest, numpy); otherwise their shards overlap silently."""
        if info is None:
            return
        if not (isinstance(info, dict) and all(isinstance(info.get(k), str) and 0 < len(info[k]) <= 64
                                               for k in ("plan", "digest", "numpy"))):
            raise P.ProtocolError("HELLO.partition must hold the strings plan, digest and numpy (64 characters at most)")
        seen = self.partitions.get(info["plan"])
        if seen is None:
            if len(self.partitions) < 1024:
                self.partitions[info["plan"]] = (info["digest"], cid, info["numpy"])
            return
        digest, other, other_numpy = seen
        if digest != info["digest"]:
            why = (f"numpy {info['numpy']} here, {other_numpy} there: their random streams differ"
                   if info["numpy"] != other_numpy else "same numpy version: the data or the code differ")
            raise P.ProtocolError(
                f"client {cid} computed a different partition than client {other} for the same data, --partition "
                f"and --seed ({why}); their shards would overlap. Use the same splitedge and numpy on every edge.",
                P.ErrorCode.INCOMPATIBLE)

    def _decode_activation(self, s: Session, frame: Any, n: int, what: str) -> tuple[np.ndarray, sc.Meta]:
        if n < 1:
            raise P.ProtocolError(f"{what}: n must be >= 1, got {n}")
        # a compressed payload may not decode to more than the largest message (a 1-bit payload would
        # otherwise make a message of --max-message-mb allocate 32 times that); checked before allocating.
        # The session's own codec decodes: another codec's payload is a PayloadError (bad_payload)
        act, meta = s.fwd.decode_with_meta(frame.buffer if isinstance(frame, zmq.Frame) else frame,
                                           max_bytes=self.cfg.max_message_bytes)
        expect = (n, *self.manifest.activation_shape)
        if act.shape != expect:
            raise P.ProtocolError(f"{what}: activation has shape {act.shape}, expected {expect}", P.ErrorCode.SHAPE_MISMATCH)
        if act.dtype != np.float32:
            raise P.ProtocolError(f"{what}: activation dtype {act.dtype}, expected float32", P.ErrorCode.SHAPE_MISMATCH)
        if not np.isfinite(act).all():
            raise P.ProtocolError(f"{what}: activation contains NaN or Inf", P.ErrorCode.NOT_FINITE)
        return act, meta

    def _on_train(self, identity: bytes, msg: P.Message) -> None:
        s = self._session(identity)
        h = msg.header
        step = h["step"]
        nbytes = msg.nbytes
        s.bytes_in += nbytes
        if step >= P.MAX_HEADER_INT:  # so that every reply's expected_step (last step + 1) is a header int
            raise P.ProtocolError(f"TRAIN: step {step} is beyond the last step id, {P.MAX_HEADER_INT - 1}")
        if step > s.planned_steps:  # e.g. 2**53 - 2, after which this client could never step again
            raise P.ProtocolError(f"TRAIN: step {step} is beyond this client's plan of {s.planned_steps} steps "
                                  "(HELLO planned_steps)")
        if s.cached is not None and step == s.cached[0]:
            log.info("client %d retried step %d: answering from cache", s.client_id, step)
            self.metrics.write("retry", client=s.client_id, step=step)
            s.bytes_out += self.ep.send(P.pack_message(_answering(s.cached[1], h["id"])), identity)
            return
        if step <= s.last_step:
            self._stale(identity, s, msg)
            return
        P.expect_frames(msg, 2)
        if h["round"] < 0 or h["total_rounds"] < 1:  # the gradient codec's arguments: checked before the step
            raise P.ProtocolError(f"TRAIN: round must be >= 0 and total_rounds >= 1, got {h['round']} and "
                                  f"{h['total_rounds']}")
        t0 = time.perf_counter()
        act, meta = self._decode_activation(s, msg.frames[0], h["n"], "TRAIN")
        labels = P.read_labels(msg.frames[1], h["n"], self.manifest.num_classes)
        t1 = time.perf_counter()
        try:
            res = self.model.train_step(act, labels)
        except StepRefused as e:
            raise P.ProtocolError(f"TRAIN: step {step} not applied: {e}",
                                  P.ErrorCode.NOT_FINITE if e.not_finite else P.ErrorCode.BAD_MESSAGE) from None
        t2 = time.perf_counter()
        grad = s.fwd.backward(res.grad, meta)
        t3 = time.perf_counter()
        blob = s.grad.encode(np.ascontiguousarray(grad, dtype=np.float32), step=h["round"], total_rounds=h["total_rounds"])
        t4 = time.perf_counter()
        self.server_step += 1
        s.last_step = step
        s.steps += 1
        self.progress[s.client_id] = self._progress_entry(s, done=False)
        fed_round = step // self.cfg.fedavg_every if self.cfg.fedavg_every and step % self.cfg.fedavg_every == 0 else None
        timings = {
            "decode_ms": round((t1 - t0) * 1000, 3), "compute_ms": round((t2 - t1) * 1000, 3),
            "backward_ms": round((t3 - t2) * 1000, 3), "encode_ms": round((t4 - t3) * 1000, 3),
        }
        reply = P.grad(h["id"], step=step, loss=res.loss, correct=res.correct, fedavg_round=fed_round,
                       timings=timings, gradient=blob)
        out = P.pack_message(reply)
        s.cached = (step, reply)
        # the step's event is written before its GRAD leaves: a process killed in between leaves a
        # recorded step whose reply was lost (the edge retries it), never an acknowledged unrecorded one
        self.metrics.write(
            "step", client=s.client_id, step=step, server_step=self.server_step, session=self.session_id, n=h["n"],
            loss=round(res.loss, 6),
            correct=res.correct, bytes_in=nbytes, bytes_out=sum(frame_len(f) for f in out),
            payload_in=frame_len(msg.frames[0]), payload_out=len(blob), shape=list(act.shape),
            edge_encode_ms=h["encode_ms"], **timings,
        )
        s.bytes_out += self.ep.send(out, identity)
        if self.cfg.log_every and self.server_step % self.cfg.log_every == 0:
            steps = ", ".join(f"c{c}:{x.last_step}" for c, x in sorted(self.by_client.items()))
            log.info("server step %d (%s) loss %.4f; in %.1f MB, out %.1f MB", self.server_step, steps, res.loss,
                     self.ep.counters.bytes_in / 1e6, self.ep.counters.bytes_out / 1e6)

    def _stale(self, identity: bytes, s: Session, msg: P.Message) -> None:
        step = msg.header["step"]
        self._reject(identity, P.ErrorCode.STALE_STEP,
                     f"step {step} was already applied (last applied: {s.last_step}); continue at {s.last_step + 1}",
                     msg, expected_step=s.last_step + 1)

    def _on_eval(self, identity: bytes, msg: P.Message) -> None:
        s = self._session(identity)
        h = msg.header
        s.bytes_in += msg.nbytes
        P.expect_frames(msg, 2 if h["has_labels"] else 1)
        act, _ = self._decode_activation(s, msg.frames[0], h["n"], "EVAL")
        labels = P.read_labels(msg.frames[1], h["n"], self.manifest.num_classes) if h["has_labels"] else None
        pred, loss_sum = self.model.evaluate(act, labels)
        if loss_sum is not None and not np.isfinite(loss_sum):
            raise P.ProtocolError(f"EVAL: the loss of these activations is {loss_sum}", P.ErrorCode.NOT_FINITE)
        if labels is not None:
            assert loss_sum is not None  # evaluate() gives the loss sum with labels
            self.metrics.write("eval", client=s.client_id, step=s.last_step, n=h["n"],
                               correct=int((np.asarray(pred) == np.asarray(labels)).sum()), loss_sum=round(loss_sum, 6))
        self._send(identity, P.eval_result(h["id"], n=h["n"], loss_sum=loss_sum, predictions=pred))

    def _on_weights(self, identity: bytes, msg: P.Message) -> None:
        s = self._session(identity)
        h = msg.header
        s.bytes_in += msg.nbytes
        if not self.cfg.fedavg_every:
            raise P.ProtocolError("FedAvg is off on this cloud (--fedavg-every 0)", P.ErrorCode.UNEXPECTED)
        # only the round this client's last step ended (the GRAD said so): weights for any other round
        # would wait in self.pending for rounds that may never complete
        every = self.cfg.fedavg_every
        if s.last_step < every or s.last_step % every or h["round"] != s.last_step // every:
            at = f"ended round {s.last_step // every}" if s.last_step >= every and not s.last_step % every \
                else "ended no round"
            raise P.ProtocolError(f"WEIGHTS for round {h['round']}, but this client's last step {s.last_step} {at}",
                                  P.ErrorCode.UNEXPECTED)
        shapes = P.check_shapes(h["names"], h["shapes"], self.client_param_shapes, "WEIGHTS")
        if sorted(h["names"]) != sorted(self.client_param_shapes):
            raise P.ProtocolError("WEIGHTS must carry every edge parameter exactly once")
        P.expect_frames(msg, len(h["names"]))
        weights = {}
        for name, shape, frame in zip(h["names"], shapes, msg.frames):
            w = P.read_array(frame, "float32", shape, f"WEIGHTS {name}").copy()
            if not np.isfinite(w).all():
                raise P.ProtocolError(f"WEIGHTS {name} contains NaN or Inf", P.ErrorCode.NOT_FINITE)
            weights[name] = w
        self.fedavg.add(h["round"], s.client_id, weights, h["samples"])
        s.fedavg_round = max(s.fedavg_round, h["round"])
        s.weights_id = h["id"]
        self._complete_rounds()

    def _complete_rounds(self) -> None:
        """Sends the average of every round that is due (see :meth:`FedAvgRounds.due`) to its clients."""
        for rnd, clients, avg, total in self.fedavg.due(self.by_client):
            for cid in clients:
                x = self.by_client.get(cid)
                if x is None or x.weights_id is None:  # gone, or back with a new session that sent no weights
                    continue
                self._send(x.identity, P.weights_avg(x.weights_id, rnd=rnd, params=avg, clients=len(clients)))
            log.info("FedAvg round %d over clients %s", rnd, clients)
            self.metrics.write("fedavg", round=rnd, clients=clients, samples=total)

    def _on_bye(self, identity: bytes, msg: P.Message) -> None:
        old = self.sessions.get(identity)
        if old is not None and old.done and msg.header["reason"] != "interrupted":
            self._send(identity, P.bye_ack(msg.header["id"]))  # a retried BYE whose BYE_ACK was lost
            return
        s = self._session(identity)
        if msg.header["reason"] == "interrupted":
            # stopped by its user, with a checkpoint: its place and FedAvg rounds are freed at once (as after
            # --client-timeout), its progress stays for --resume; no reply (the edge is gone)
            s.timed_out, s.stopped_at = True, time.monotonic()
            log.info("client %d stopped after %d steps (interrupted); its place is free until it resumes",
                     s.client_id, msg.header["steps"])
            self.metrics.write("client_stopped", client=s.client_id, steps=msg.header["steps"], applied=s.last_step)
            self._complete_rounds()
            return
        s.done = True
        s.cached = None  # a finished client sends no retries: free its last reply
        self.progress[s.client_id] = self._progress_entry(s, done=True)
        log.info("client %d finished after %d steps (%s)", s.client_id, msg.header["steps"], msg.header["reason"])
        self.metrics.write("client_done", client=s.client_id, steps=msg.header["steps"], applied=s.last_step,
                           reason=msg.header["reason"], bytes_in=s.bytes_in, bytes_out=s.bytes_out)
        self._send(identity, P.bye_ack(msg.header["id"]))
        self._complete_rounds()

    def _on_ping(self, identity: bytes, msg: P.Message) -> None:
        self._send(identity, P.pong(msg.header["id"], t=msg.header["t"]))

    _handlers = {
        P.MsgType.HELLO: _on_hello,
        P.MsgType.TRAIN: _on_train,
        P.MsgType.EVAL: _on_eval,
        P.MsgType.WEIGHTS: _on_weights,
        P.MsgType.BYE: _on_bye,
        P.MsgType.PING: _on_ping,
    }

def _check_hello(h: dict[str, Any]) -> None:
    """ProtocolError naming the first HELLO field out of its range (types are checked by the schema)."""
    top = P.MAX_HEADER_INT
    for key, lo, hi in (("num_clients", 1, top), ("client_id", 0, h["num_clients"] - 1), ("samples", 0, top),
                        ("planned_steps", 1, top - 1), ("resume_step", 0, top - 1)):
        if not lo <= h[key] <= hi:
            raise P.ProtocolError(f"HELLO: {key} must be in {lo}..{hi}, got {h[key]}")
    if "fresh" in h and not isinstance(h["fresh"], bool):
        raise P.ProtocolError("HELLO: fresh must be true or false")
    if "client_files" in h and not (isinstance(h["client_files"], str) and len(h["client_files"]) <= 64):
        raise P.ProtocolError("HELLO: client_files must be a string of at most 64 characters")


def serve(cfg: ServeConfig) -> int:
    if not os.environ.get("SPLITEDGE_NO_LOG_SETUP"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    server = CloudServer(cfg)
    return server.run()


def _answering(reply: P.Message, request_id: int) -> P.Message:
    """``reply`` as the answer to request ``request_id`` (a cached reply sent again to a retry)."""
    return P.Message(reply.type, {**reply.header, "reply_to": request_id}, reply.frames)
