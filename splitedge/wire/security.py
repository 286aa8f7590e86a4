"""CurveZMQ encryption and ZAP authentication for the cloud and its edges.

``splitedge keys generate DIR --clients N`` writes, with ZeroMQ's certificate format
(``zmq.auth``: a ZPL text file with the Z85-encoded keys, readable by any ZeroMQ
binding)::

    DIR/server.key                  the cloud's public key: give it to every edge (--server-key)
    DIR/server.key_secret           the cloud's key pair: keep it on the cloud (--curve-secret)
    DIR/clients/client-<i>.key_secret   one key pair per edge: copy to that edge only (--curve-secret)
    DIR/authorized_clients/client-<i>.key   the edges' public keys: the cloud's --authorized-clients

With keys, the cloud's ROUTER is a CURVE server and a ZAP handler (pyzmq's
ThreadAuthenticator) admits only the public keys found in ``--authorized-clients``:
traffic is encrypted and authenticated, and an unlisted edge's handshake is refused
before any of its messages reach the server. Secret key files are written 0600.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import zmq
import zmq.auth

log = logging.getLogger("splitedge.wire.security")


class KeyFileError(ValueError):
    """A key file that is missing or not a ZeroMQ certificate."""


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized_dir: Path


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"key file {p} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError, zmq.ZMQError) as e:
        raise KeyFileError(f"{p} is not a ZeroMQ certificate: {e}") from None
    if not secret:
        raise KeyFileError(f"{p} holds no secret key (use the .key_secret file, not the public .key)")
    _check_z85(p, public, "public")
    _check_z85(p, secret, "secret")
    return public, secret


def _check_z85(p: Path, key: bytes | None, which: str) -> None:
    """KeyFileError unless ``key`` is a CurveZMQ key: 40 Z85 characters (32 bytes); libzmq would refuse
    another length only when the socket is set up."""
    from zmq.utils import z85

    try:
        ok = key is not None and len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        ok = False
    if not ok:
        raise KeyFileError(f"{p}: its {which} key is not a CurveZMQ key (40 Z85 characters)")


def load_public(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"key file {p} does not exist")
    try:
        public, _ = zmq.auth.load_certificate(str(p))
    except (OSError, ValueError, zmq.ZMQError) as e:
        raise KeyFileError(f"{p} is not a ZeroMQ certificate: {e}") from None
    _check_z85(p, public, "public")
    return public


def server_config(secret_file: str, authorized_dir: str) -> CurveServer:
    public, secret = load_keypair(secret_file)
    d = Path(authorized_dir)
    if not d.is_dir():
        raise KeyFileError(f"--authorized-clients {d} is not a directory")
    keys = list(d.glob("*.key"))
    if not keys:
        raise KeyFileError(f"--authorized-clients {d} holds no *.key files: no edge could join")
    for k in keys:
        load_public(k)  # fail at start, not at the first handshake
    return CurveServer(public, secret, d)


def client_config(secret_file: str, server_key_file: str) -> CurveClient:
    public, secret = load_keypair(secret_file)
    return CurveClient(public, secret, load_public(server_key_file))


def start_authenticator(ctx: zmq.Context, cfg: CurveServer):
    """A ZAP handler thread admitting only the public keys in ``cfg.authorized_dir``."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("splitedge.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=str(cfg.authorized_dir))
    return auth


def apply_server(sock: zmq.Socket, cfg: CurveServer) -> None:
    sock.curve_secretkey = cfg.secret
    sock.curve_publickey = cfg.public
    sock.curve_server = True


def apply_client(sock: zmq.Socket, cfg: CurveClient) -> None:
    sock.curve_secretkey = cfg.secret
    sock.curve_publickey = cfg.public
    sock.curve_serverkey = cfg.server_public


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints bound to a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://\[?([^\]]+?)\]?:(\d+|\*)", endpoint)
    if not m:
        return False
    host = m.group(1)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or '*': reachable from outside


def generate(directory: str | os.PathLike[str], clients: int) -> dict[str, list[Path]]:
    d = Path(directory)
    if (d / "server.key_secret").exists():
        raise KeyFileError(f"{d} already holds keys; refusing to overwrite them (use an empty directory)")
    try:
        (d / "clients").mkdir(parents=True, exist_ok=True)
        (d / "authorized_clients").mkdir(exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot create the key directory {d}: {e.strerror or e}") from None
    pub, sec = zmq.auth.create_certificates(str(d), "server")
    os.chmod(sec, 0o600)
    made = {"server": [Path(pub), Path(sec)], "clients": []}
    for i in range(clients):
        cpub, csec = zmq.auth.create_certificates(str(d / "clients"), f"client-{i}")
        os.chmod(csec, 0o600)
        shutil.move(cpub, d / "authorized_clients" / Path(cpub).name)
        made["clients"].append(Path(csec))
    return made


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def keys() -> None:
    """CurveZMQ keys for encrypted, authenticated cloud <-> edge traffic."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--clients", type=click.IntRange(min=1), default=1, show_default=True, help="Edge key pairs to create.")
def generate_cmd(directory: str, clients: int) -> None:
    """Create the cloud's key pair and CLIENTS edge key pairs in DIRECTORY."""
    try:
        made = generate(directory, clients)
    except KeyFileError as e:
        raise click.UsageError(str(e)) from None
    d = Path(directory)
    click.echo(f"wrote {d}/server.key (public) and {d}/server.key_secret (secret, 0600)")
    click.echo(f"wrote {len(made['clients'])} edge key pairs in {d}/clients/ and their public keys in "
               f"{d}/authorized_clients/")
    click.echo("\ncloud:  cloud-serve ... --curve-secret "
               f"{d}/server.key_secret --authorized-clients {d}/authorized_clients")
    click.echo("edge i: edge-train ... --curve-secret client-<i>.key_secret --server-key server.key")
    click.echo("Copy each edge only its own client-<i>.key_secret and the server's public server.key.")
