"""The edge's side of a conversation with the cloud: one request at a time, one reply to each.

:class:`Channel` numbers each request (``id``), sends it, and returns the first reply whose
``reply_to`` names it -- the one matching rule (see :mod:`splitedge.wire.protocol`). While it
waits it sends it again under the same id when ``request_timeout_s`` passes (doubling), PINGs
every ``heartbeat_s`` so the cloud knows the edge is alive, watches the CurveZMQ handshake,
and gives up after ``give_up_s``. :meth:`Channel.retry_later` is the backoff for answers that
allow no progress yet (a full cloud, a lost session).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from collections.abc import Callable

from . import protocol as P
from .shaping import LinkInterrupted
from .transport import Endpoint

log = logging.getLogger("edge-train")

RETRY_FIRST_S = 0.5  # first wait before asking the cloud again after an answer that allows no progress
RETRY_MAX_S = 30.0  # longest such wait (doubling from RETRY_FIRST_S)


class ChannelError(RuntimeError):
    """No usable answer: the cloud is unreachable, refused the handshake, or speaks another protocol version."""


class RemoteError(Exception):
    """An ERROR from the cloud. Its code and message are the cloud's text: capped and with control
    characters escaped (:func:`splitedge.wire.protocol.printable`) before they reach a log or a terminal."""

    def __init__(self, header: dict):
        self.header = header
        self.code = header.get("code", "")
        super().__init__(f"{P.printable(self.code, 64)}: {P.printable(header.get('message', ''), 1000)}")


class Channel:
    def __init__(self, ep: Endpoint, *, peer: str, request_timeout_s: float, give_up_s: float, heartbeat_s: float,
                 server_key: str | None = None, link: Any = None, check_stop: Callable[[], None] = lambda: None,
                 on_bytes: Callable[[int, int], None] = lambda sent, received: None):
        self.ep = ep
        self.peer = peer
        self.request_timeout_s = request_timeout_s
        self.give_up_s = give_up_s
        self.heartbeat_s = heartbeat_s
        self.server_key = server_key
        self.link = link
        self.check_stop = check_stop  # raises to end a wait (e.g. on SIGINT)
        self.on_bytes = on_bytes  # (sent, received) byte counts as they happen
        self._next_id = 0
        self._stuck_since: float | None = None  # first answer, since the last progress, that made the edge ask again
        self._backoff = RETRY_FIRST_S

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _try_send(self, frames: list[Any]) -> int | None:
        sent = self.ep.try_send(frames)
        self.on_bytes(sent or 0, 0)
        return sent

    def send(self, msg: P.Message) -> None:
        """Sends request ``msg`` once, expecting no reply (a BYE on the way out)."""
        self._try_send(P.pack_request(msg, self._id()))

    def request(self, msg: P.Message, want: P.MsgType) -> P.Message:
        """Sends request ``msg`` and returns its reply of type ``want``. An ERROR answering it raises
        :class:`RemoteError`; no answer within ``give_up_s`` (or a refused handshake, or another protocol
        version) raises :class:`ChannelError`."""
        rid = self._id()
        out = P.pack_request(msg, rid)
        deadline = time.monotonic() + self.give_up_s
        if self.link is not None:
            self.link.deadline = deadline
        try:
            return self._exchange(msg.type, rid, out, want, deadline)
        except LinkInterrupted:
            self.check_stop()
            raise ChannelError(f"{msg.type.name} and its answer cannot cross the emulated link "
                               f"({self.link.describe()}) within --give-up {self.give_up_s:g}s") from None
        finally:
            if self.link is not None:
                self.link.deadline = None

    def _check_handshake(self) -> None:
        failure = self.ep.handshake_failure()
        if failure == "auth":
            raise ChannelError(f"the cloud at {self.peer} refused this edge's CurveZMQ key: is its public key "
                               "in the cloud's --authorized-clients directory, and --server-key the cloud's key?")
        if failure == "protocol":
            if self.server_key:
                raise ChannelError(f"the CurveZMQ handshake with {self.peer} failed: is --server-key "
                                   f"{self.server_key} the public key of this cloud's --curve-secret, and does "
                                   "the cloud use CurveZMQ at all (cloud-serve --curve-secret)?")
            raise ChannelError(f"the handshake with {self.peer} failed: the cloud and this edge disagree on "
                               "encryption (a cloud with --curve-secret needs edges with --curve-secret and "
                               "--server-key, and the other way round)")

    def _exchange(self, type_: P.MsgType, rid: int, out: list, want: P.MsgType, deadline: float) -> P.Message:
        timeout = self.request_timeout_s
        sent = self._try_send(out)  # None: no connection to the cloud yet; sent again below
        sent_at = time.monotonic()
        last_ping = started = sent_at
        waiting_noted = type_ != P.MsgType.HELLO  # first contact: say early that nothing has answered yet
        malformed: tuple[int, str] | None = None  # (count, last reason) of unparsable replies
        while True:
            self.check_stop()
            now = time.monotonic()
            self._check_handshake()
            if now > deadline:
                if malformed:
                    raise ChannelError(f"the cloud at {self.peer} sent no valid answer to {type_.name} for "
                                       f"{self.give_up_s:.0f}s but {malformed[0]} malformed message(s); the last: "
                                       f"{malformed[1]}")
                raise ChannelError(f"the cloud at {self.peer} did not answer {type_.name} for "
                                   f"{self.give_up_s:.0f}s; is cloud-serve running and reachable?")
            if not waiting_noted and now - started > 5.0:
                waiting_noted = True
                log.warning("no answer from the cloud at %s yet: is cloud-serve running there, at that address? "
                            "(waiting up to --give-up %.0fs)", self.peer, self.give_up_s)
            if sent is None or now - sent_at > timeout:
                if sent is not None:
                    log.warning("no reply to %s from %s after %.1fs: retrying (same request id; giving up in %.0fs)",
                                type_.name, self.peer, now - sent_at, deadline - now)
                    timeout = min(timeout * 2, 60.0)
                if sent is not None or now - sent_at > 0.1:
                    sent = self._try_send(out)
                    sent_at = now
            if now - last_ping > self.heartbeat_s:
                self.send(P.ping(t=time.time()))
                last_ping = now
            got = self.ep.recv(timeout_ms=100)
            if got is None:
                continue
            _, frames_in = got
            self.on_bytes(0, sum(len(f.buffer) for f in frames_in))
            try:
                msg = P.unpack(frames_in)
            except P.VersionError as e:
                raise ChannelError(f"the cloud at {self.peer} speaks splitedge protocol version {e.version}, this "
                                   f"edge version {P.PROTOCOL_VERSION}: run one splitedge release on both sides") \
                    from None
            except P.ProtocolError as e:
                log.warning("ignoring a malformed message from the cloud: %s", e)
                malformed = (malformed[0] + 1 if malformed else 1, str(e)[:300])
                continue
            # the one matching rule: a reply answers the request whose id it names; an ERROR that names none
            # is about a message the cloud could not read, which can only be the one outstanding
            reply_to = msg.header.get("reply_to")
            if msg.type == P.MsgType.ERROR and reply_to in (rid, None):
                raise RemoteError(msg.header)
            if msg.type == want and reply_to == rid:
                return msg
            # PONGs, late duplicate replies to earlier requests: dropped

    # ------------------------------------------------------------------ waiting for a cloud that allows no progress

    def retry_later(self, e: RemoteError, what: str) -> None:
        """Waits before asking the cloud again after answer ``e`` (server_full, unknown_client, a stale_step
        naming no later step): with exponential backoff, ended by ``check_stop``, and ChannelError once
        ``give_up_s`` seconds have passed since the last :meth:`progressed`."""
        now = time.monotonic()
        if self._stuck_since is None:
            self._stuck_since, self._backoff = now, RETRY_FIRST_S
        waited = now - self._stuck_since
        if waited + self._backoff > self.give_up_s:
            raise ChannelError(f"{what} within --give-up {self.give_up_s:g}s: the cloud at {self.peer} "
                               f"answered {e} to every request for {waited:.0f}s") from None
        log.warning("%s: %s; asking again in %.1fs", what, e, self._backoff)
        self.pause(self._backoff)
        self._backoff = min(2 * self._backoff, RETRY_MAX_S)

    def progressed(self) -> None:
        """The cloud let the edge go on (a step, an evaluation, a FedAvg round): the give-up clock restarts."""
        self._stuck_since = None

    def pause(self, seconds: float) -> None:
        """Sleeps ``seconds``; ``check_stop`` ends it at once."""
        end = time.monotonic() + seconds
        while True:
            self.check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def close(self, linger_ms: int = 0) -> None:
        self.ep.close(linger_ms=linger_ms)
