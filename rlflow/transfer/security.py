"""CURVE keys for the bus: who may connect, and encryption of everything on the wire.

Key directory layout (made by ``rlflow bus keygen DIR``, or on first use by a server given ``keys_dir``):

    DIR/server.key, DIR/server.key_secret   the bus server's keypair; clients need ``server.key``
    DIR/client.key, DIR/client.key_secret   a client keypair for this deployment's roles
    DIR/authorized/*.key                    public keys the server accepts (client.key is copied here)

A client whose public key is not in ``authorized/`` fails the CURVE handshake: ZeroMQ delivers none of
its messages, so it can neither read nor write (it sees its calls time out).
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
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


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, keys_dir: str | Path) -> ThreadAuthenticator:
    """Make ``sock`` (not yet bound) a CURVE server accepting only the authorized client keys."""
    d = keygen(keys_dir)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(d / "authorized"))
    public, secret = zmq.auth.load_certificate(d / "server.key_secret")
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True
    return auth


def client_curve(sock: zmq.Socket, keys_dir: str | Path, client_name: str = "client") -> None:
    """Configure ``sock`` (not yet connected) as a CURVE client of the server whose keys are in ``keys_dir``."""
    d = Path(keys_dir)
    for f in ("server.key", f"{client_name}.key_secret"):
        if not (d / f).exists():
            raise FileNotFoundError(f"CURVE key {d / f} is missing; create keys with `rlflow bus keygen {d}`")
    server_public, _ = zmq.auth.load_certificate(d / "server.key")
    public, secret = zmq.auth.load_certificate(d / f"{client_name}.key_secret")
    sock.curve_serverkey = server_public
    sock.curve_publickey, sock.curve_secretkey = public, secret
