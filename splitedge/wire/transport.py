"""ZeroMQ sockets for the two sides. The transport moves frames and counts their bytes;
it knows nothing of codecs or message meaning (see :mod:`splitedge.wire.protocol`).

Byte counts are the sizes of the frames handed to / received from ZeroMQ: the
protocol header frame plus every payload frame. ZeroMQ's own framing (2-9 bytes per
frame) and TCP/IP headers are not included.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass
from typing import Any

import zmq

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


_ENDPOINT = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.%\w]+\]|[^:/\[\]\s]+):\d{1,5}|ipc://\S+|inproc://\S+)$")


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if it is a ZeroMQ endpoint this project uses (tcp://HOST:PORT, tcp://[IPv6]:PORT,
    ipc://PATH, inproc://NAME), else ValueError naming the accepted forms."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint: write tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555, "
                         "tcp://*:5555 to listen on every interface, tcp://[::1]:5555) or ipc://PATH")
    if endpoint.startswith("tcp://") and not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"{endpoint!r}: the port must lie in 1..65535")
    return endpoint


def _ipc_path(endpoint: str) -> str | None:
    """The file path of an ipc:// endpoint; None for other transports, ZeroMQ's ``ipc://*`` (a fresh
    name it picks) and Linux's abstract names (``ipc://@NAME``, no file)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    if path == "*" or path.startswith("@"):
        return None
    return path


def _socket_in_use(path: str) -> bool:
    """True if a process accepts connections on the Unix socket ``path`` (a live server, not a stale file)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:  # ECONNREFUSED: nobody listens (stale); anything else: not usable either way
        return False
    finally:
        s.close()
    return True


def check_bind_endpoint(endpoint: str) -> str:
    """``endpoint`` if a server may bind it, else ValueError saying why.

    Beyond :func:`check_endpoint`: binding ``ipc://PATH`` makes ZeroMQ delete whatever is at PATH
    and put its socket there, so PATH must not exist, or be a stale socket (one nobody listens on,
    e.g. left by a server that stopped); its directory must exist.
    """
    check_endpoint(endpoint)
    path = _ipc_path(endpoint)
    if path is None:
        return endpoint
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{endpoint!r}: the directory {parent!r} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return endpoint
    except OSError as e:
        raise ValueError(f"{endpoint!r}: cannot inspect {path!r}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode) \
            else "a file"
        raise ValueError(f"{endpoint!r}: {path!r} exists and is {kind}, not a socket (binding there would delete "
                         "it): choose a path that does not exist; ipc:// creates its socket file itself")
    if _socket_in_use(path):
        raise ValueError(f"{endpoint!r}: another process is listening on {path!r} (address already in use)")
    return endpoint


def check_connect_endpoint(endpoint: str) -> str:
    """``endpoint`` if a client may connect to it, else ValueError. An ipc:// path need not exist yet
    (the server may start later), but one that exists and is not a socket can never be served."""
    check_endpoint(endpoint)
    path = _ipc_path(endpoint)
    if path is not None:
        try:
            st = os.stat(path)
        except OSError:
            return endpoint
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{endpoint!r}: {path!r} exists and is not a socket: no server can listen there")
    return endpoint


def _option(check: Any, value: str) -> str:
    import click

    try:
        return check(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def endpoint_option(ctx: Any, param: Any, value: str) -> str:
    """click callback of an endpoint to connect to: a bad endpoint is a bad parameter (exit code 2)."""
    return _option(check_connect_endpoint, value)


def bind_endpoint_option(ctx: Any, param: Any, value: str) -> str:
    """click callback of an endpoint to bind (see :func:`check_bind_endpoint`): exit code 2."""
    return _option(check_bind_endpoint, value)


def frame_len(f: Any) -> int:
    if isinstance(f, zmq.Frame):
        return len(f.buffer)
    return memoryview(f).nbytes


@dataclass
class Counters:
    bytes_out: int = 0
    bytes_in: int = 0


class Endpoint:
    """One socket plus byte counters. ``send``/``recv`` take and return lists of frames.

    An optional :class:`splitedge.wire.shaping.Link` delays sends and receives as an
    emulated rate-limited, high-latency link would (the edge's access link).
    """

    def __init__(self, sock: zmq.Socket, *, router: bool, link: Any = None):
        self.sock = sock
        self.monitor: zmq.Socket | None = None
        self._handshake: str | None = None
        self.router = router
        self.link = link if link is not None and link.active else None
        self.counters = Counters()
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def send(self, frames: list[Any], identity: bytes | None = None) -> int:
        n = sum(frame_len(f) for f in frames)
        if self.link is not None:
            self.link.before_send(n)
        parts = ([identity] if self.router else []) + list(frames)
        self.sock.send_multipart(parts, copy=False)
        self.counters.bytes_out += n
        return n

    def recv(self, timeout_ms: int | None) -> tuple[bytes | None, list[zmq.Frame]] | None:
        """One message, or None on timeout. For a ROUTER, (identity, frames); else (None, frames)."""
        if timeout_ms is not None and not self._poller.poll(timeout_ms):
            return None
        parts = self.sock.recv_multipart(copy=False)
        identity = None
        if self.router:
            identity = parts[0].bytes
            parts = parts[1:]
        n = sum(frame_len(f) for f in parts)
        if self.link is not None:
            self.link.after_recv(n)
        self.counters.bytes_in += n
        return identity, parts

    def try_send(self, frames: list[Any]) -> int | None:
        """Sends without blocking (a DEALER with no connected peer would block): bytes sent, or None."""
        n = sum(frame_len(f) for f in frames)
        if self.link is not None:
            self.link.before_send(n)
        try:
            self.sock.send_multipart(list(frames), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.counters.bytes_out += n
        return n

    def handshake_failure(self) -> str | None:
        """Why the last handshake with the peer failed ("auth", "protocol"), or None (client sockets)."""
        mon = self.monitor
        if mon is None:
            return None
        from zmq.utils.monitor import recv_monitor_message

        while mon.poll(0):
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._handshake = "auth"
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._handshake = "protocol"
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake = None
        return self._handshake

    def close(self, linger_ms: int = 0) -> None:
        mon = self.monitor
        if mon is not None:
            self.sock.disable_monitor()
            mon.close(linger=0)
        self.sock.close(linger=linger_ms)


def server_socket(ctx: zmq.Context, bind: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  curve: Any = None) -> Endpoint:
    """A ROUTER bound to ``bind``; with ``curve`` (:class:`splitedge.wire.security.CurveServer`) a CURVE
    server whose peers the caller's ZAP handler must authenticate."""
    try:
        check_bind_endpoint(bind)  # never let ZeroMQ delete a file (or another server's socket) at an ipc:// path
    except ValueError as e:
        raise OSError(f"cannot bind: {e}") from None
    sock = ctx.socket(zmq.ROUTER)
    if curve is not None:
        from .security import apply_server

        apply_server(sock, curve)
    sock.setsockopt(zmq.LINGER, 1000)
    # libzmq drops a peer whose message is over this size before allocating it
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    try:
        sock.bind(bind)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise OSError(f"cannot bind {bind}: {e}") from None
    return Endpoint(sock, router=True)


def client_socket(ctx: zmq.Context, connect: str, identity: bytes, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  link: Any = None, curve: Any = None) -> Endpoint:
    """A DEALER connected to ``connect``; with ``curve`` (:class:`splitedge.wire.security.CurveClient`)
    encrypted. ``Endpoint.handshake_failure()`` tells why the peer refused us, if it did."""
    sock = ctx.socket(zmq.DEALER)
    if curve is not None:
        from .security import apply_client

        apply_client(sock, curve)
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_SUCCEEDED
    )
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    try:
        sock.connect(connect)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise OSError(f"cannot connect to {connect}: {e}") from None
    ep = Endpoint(sock, router=False, link=link)
    ep.monitor = monitor
    return ep

