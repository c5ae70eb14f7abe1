"""CURVE keys for the bus: who may connect, and encryption of everything on the wire.

Key directory layout (made by ``rlflow bus keygen DIR``, or on first use by a server given ``keys_dir``):

    DIR/server.key, DIR/server.key_secret   the bus server's keypair; clients need ``server.key``
    DIR/client.key, DIR/client.key_secret   a client keypair for this deployment's roles
    DIR/authorized/*.key                    public keys the server accepts (client.key is copied here)

A client whose public key is not in ``authorized/`` fails the CURVE handshake: ZeroMQ delivers none of
its messages, so it can neither read nor write (it sees its calls time out).

Wherever a ``keys_dir`` is taken, the keys themselves may be given instead (``CurveKeys``, read once
with ``load_keys``): a process that got its keys from whoever started it holds them in memory and
writes nothing where it runs, so nothing is left behind when it is killed.

**An address names its server's key.** A CURVE server advertises where it listens as
``tcp://host:port?curve=<its public key in hex>`` (``pinned``), and a client checks the server against
the key its address names (``connect``); only an address that names none falls back to the keys'
``server_public`` (one server keypair per key directory, as ``rlflow bus serve`` uses). So every server
of a run can hold a keypair of its own: a process that learns another server's address learns that
server's public key, never a secret that would let it pose as that server.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.auth.thread import ThreadAuthenticator


def is_local(address: str) -> bool:
    """True for ipc://, inproc:// and tcp on a loopback host: endpoints no other machine can reach."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a hostname: may be reachable from elsewhere


def keygen(keys_dir: str | Path) -> Path:
    """Create the server and client keypairs in ``keys_dir`` unless they exist; returns the directory."""
    d = Path(keys_dir)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    for name in ("server", "client"):
        if not (d / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(d, name)
        (d / f"{name}.key_secret").chmod(0o600)  # a secret key is its owner's alone, whatever the umask
    if not (d / "authorized" / "client.key").exists():
        shutil.copy(d / "client.key", d / "authorized" / "client.key")
    return d


@dataclass(frozen=True)
class CurveKeys:
    """A process's CURVE keys, in memory (z85 bytes, as ``zmq.auth.load_certificate`` gives them)."""

    public: bytes  # this process's keypair: its client key, and its server key unless server_secret is set
    secret: bytes = field(repr=False)
    server_public: bytes | None = None  # the server a client checks when the address names no key (a key
    # directory's server); None: every address this process connects to must name its server's key
    server_secret: bytes | None = field(default=None, repr=False)  # serve as ``server_public`` (a key
    # directory's bus) instead of with this process's own keypair
    authorized: Any = ()  # client public keys a server accepts: a tuple, or an object whose
    # ``callback(domain, key)`` says (keys that change during a run: a registry of the run's processes)


def load_keys(keys_dir: str | Path, client_name: str = "client") -> CurveKeys:
    """The keys of ``keys_dir`` (see the module docstring), read once."""
    d = Path(keys_dir)
    for f in ("server.key", f"{client_name}.key_secret"):
        if not (d / f).exists():
            raise FileNotFoundError(f"CURVE key {d / f} is missing; create keys with `rlflow bus keygen {d}`")
    server_public, server_secret = zmq.auth.load_certificate(d / ("server.key_secret" if (d / "server.key_secret").exists()
                                                                  else "server.key"))
    public, secret = zmq.auth.load_certificate(d / f"{client_name}.key_secret")
    authorized = tuple(zmq.auth.load_certificate(f)[0] for f in sorted((d / "authorized").glob("*.key")))
    return CurveKeys(public, secret, server_public, server_secret, authorized)


class _Authorized:
    """The ZAP credentials check of a server holding ``CurveKeys``: its authorized public keys."""

    def __init__(self, keys: tuple[bytes, ...]):
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, keys: str | Path | CurveKeys) -> tuple[ThreadAuthenticator, bytes]:
    """Make ``sock`` (not yet bound) a CURVE server accepting only the authorized client keys; returns
    the authenticator and the public key it serves with (``pinned`` puts it in the bound address)."""
    keys = keys if isinstance(keys, CurveKeys) else load_keys(keygen(keys))
    public, secret = (keys.server_public, keys.server_secret) if keys.server_secret else (keys.public, keys.secret)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    provider = keys.authorized if hasattr(keys.authorized, "callback") else _Authorized(keys.authorized)
    auth.configure_curve_callback(domain="*", credentials_provider=provider)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True
    return auth, public


PIN = "?curve="


def pinned(address: str, server_public: bytes) -> str:
    """``address`` naming the public key of the CURVE server listening there."""
    return f"{address}{PIN}{z85.decode(server_public).hex()}"


def unpin(address: str) -> tuple[str, bytes | None]:
    """``(the address to connect to, the server key it names or None)``."""
    bare, sep, key = address.partition(PIN)
    if not sep:
        return address, None
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"address {address!r}: after {PIN!r} comes the server's CURVE public key as 64 hex "
                         f"digits; got {key!r}")
    return bare, z85.encode(raw)


def connect(sock: zmq.Socket, address: str, keys: str | Path | CurveKeys | None = None,
            client_name: str = "client") -> None:
    """Connect ``sock`` to ``address``: a CURVE client when ``keys`` are given, checking the server against
    the key the address names (else the keys' ``server_public``)."""
    bare, server_public = unpin(address)
    if keys is not None:
        keys = keys if isinstance(keys, CurveKeys) else load_keys(keys, client_name)
        server_public = server_public or keys.server_public
        if server_public is None:
            raise ValueError(f"address {address!r} names no CURVE server key and these keys hold none: connect "
                             f"to the address the server advertised (it ends in {PIN}<key>)")
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.connect(bare)
