"""Secrets reach Ray actors over our own encrypted socket, never through Ray: only public keys travel there.

Anyone who can read a Ray cluster's object store can read the arguments of its actors. So under
``launcher=ray`` the launcher ships each actor a plan stripped of its secrets (``split``), and the
actor fetches them from the launcher's credential service:

    actor:    keypair = zmq.curve_keypair()          made where it runs, held in memory; Ray returns only
                                                     its public half to the launcher (``public_key()``)
    launcher: service.admit(public, secrets)         this key, and only this key, may fetch these secrets
    actor:    secrets = fetch(service, keypair)      CURVE: the launcher's server key is in the plan (public),
                                                     the actor proves its own key in the handshake
              plan = join(public_plan, secrets)

Invariants:
- The service answers only a connection whose CURVE key it admitted (ZAP: an unknown key fails the
  handshake and reads nothing), and each admitted key once: the secrets are dropped as they are sent.
- A key is admitted only after Ray returned it from the very actor the launcher created for that replica.
- Every wait is bounded: ``fetch`` by the caller's timeout, with an error naming the service; the
  service's thread polls in steps and stops on ``close``.

What counts as a secret is what ``split`` takes out: bus tokens, the weight channel key and sglang API
keys. No CURVE secret is shipped at all: an actor serves and connects with the keypair it made, and the
addresses it is given name the public key of the server listening there (``transfer/security.pinned``).
Everything else in a plan is public.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

from rlflow.transfer.access import Grant

POLL_MS = 200  # the service's thread checks for ``close`` this often
RESEND_S = 1.0  # a fetch tries a fresh connection this often until answered (its key may be admitted late)
MAX_PENDING = 4096  # admitted keys not yet fetched: one per replica start; a bound, not a budget


# ------------------------------------------------------------------------------------------ the secrets
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sglang_key(config) -> str | None:
    sglang = getattr(config, "sglang", None)
    return getattr(sglang, "api_key", None)


def _with_sglang_key(config, key: str | None):
    if getattr(config, "sglang", None) is None:
        return config
    return dataclasses.replace(config, sglang=dataclasses.replace(config.sglang, api_key=key))


def split(plan):
    """``(public plan, secrets)``: the plan with every secret taken out, and those secrets as JSON-able data."""
    if plan.wiring.keys is not None:
        raise ValueError(f"{plan.name}: a plan for a Ray actor carries no CURVE keys (the actor makes its own)")
    args, broadcast = plan.args, getattr(plan.args, "broadcast", None)
    secrets = {"bus_token": plan.bus_token,
               "channel_secret": _b64(plan.channel_secret) if plan.channel_secret else None,
               "sglang_key": _sglang_key(plan.config),
               "broadcast_key": _sglang_key(broadcast) if broadcast is not None else None}
    if broadcast is not None:
        args = dataclasses.replace(args, broadcast=_with_sglang_key(broadcast, None))
    public = plan.replace(bus_token=None, channel_secret=None, config=_with_sglang_key(plan.config, None), args=args)
    return public, secrets


def join(plan, secrets: dict):
    """The plan ``split`` took apart, whole again."""
    args = plan.args
    if getattr(args, "broadcast", None) is not None:
        args = dataclasses.replace(args, broadcast=_with_sglang_key(args.broadcast, secrets["broadcast_key"]))
    return plan.replace(bus_token=secrets["bus_token"],
                        channel_secret=base64.b64decode(secrets["channel_secret"]) if secrets["channel_secret"] else None,
                        config=_with_sglang_key(plan.config, secrets["sglang_key"]), args=args)


def split_server(config):
    """``(public ServerConfig, secrets)`` for the bus actor: its grants' tokens (its CURVE keypair is its own)."""
    if config.keys_dir is not None:
        raise ValueError("a bus config for a Ray actor carries no CURVE keys (the actor makes its own)")
    secrets = {"grants": {t: dataclasses.asdict(g) for t, g in (config.grants or {}).items()},
               "has_grants": config.grants is not None}
    return dataclasses.replace(config, grants=None), secrets


def join_server(config, secrets: dict):
    grants = ({t: Grant(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})
               for t, g in secrets["grants"].items()} if secrets["has_grants"] else None)
    return dataclasses.replace(config, grants=grants)


# ------------------------------------------------------------------------------------------ the service
class _Admitted:
    """The ZAP check: a client key the launcher admitted and that has not fetched yet."""

    def __init__(self, pending: dict):
        self.pending = pending

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode() in self.pending


class CredentialService:
    """The launcher's side: a CURVE ROUTER on ``host`` that hands each admitted key its secrets, once."""

    def __init__(self, host: str):
        self.public, secret = zmq.curve_keypair()
        self.ctx = zmq.Context()  # its own: a context has one ZAP handler, and the control socket's is the other
        self.pending: dict[str, dict] = {}  # z85 public key -> its secrets, until fetched
        self.lock = threading.Lock()
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=_Admitted(self.pending))
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # a fetch is a few bytes
        self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_server = self.public, secret, True
        self.sock.bind(f"tcp://{host}:0")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rlflow-credentials", daemon=True)
        self._thread.start()

    @property
    def where(self) -> tuple[str, str]:
        """What a plan carries to find this service: its address and public key (both public)."""
        return self.address, self.public.decode()

    def admit(self, public_key: str, secrets: dict) -> None:
        """Let ``public_key`` (z85) fetch ``secrets`` once."""
        with self.lock:
            if len(self.pending) >= MAX_PENDING:
                raise RuntimeError(f"{len(self.pending)} admitted keys were never fetched: replicas start but "
                                   f"never ask for their credentials")
            self.pending[public_key] = secrets

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.auth.stop()
        self.ctx.term()

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(POLL_MS):
                    continue
                frames = self.sock.recv_multipart(copy=False)
                identity, user = frames[0].bytes, frames[-1].get("User-Id")
                with self.lock:
                    secrets = self.pending.pop(user, None)
                reply = {"ok": True, "secrets": secrets} if secrets is not None else {
                    "ok": False, "error": "this key has no credentials here (fetched already, or never admitted)"}
                try:
                    self.sock.send_multipart([identity, json.dumps(reply).encode()], zmq.NOBLOCK)
                    self.served += secrets is not None
                except zmq.ZMQError:  # the fetcher went away: its secrets are gone with its keypair
                    pass
        finally:
            self.sock.close(0)


def fetch(where: tuple[str, str], keypair: tuple[bytes, bytes], timeout: float) -> dict:
    """This process's secrets from the launcher's service at ``where`` (address, server public key),
    authenticated with ``keypair`` (public, secret). Waits up to ``timeout``: the launcher admits the key
    once Ray has handed it over, which may be a moment after this process starts.

    A handshake with a key not admitted yet is refused, and ZeroMQ does not retry a refused handshake
    (the connection is dropped for good), so each try is a fresh connection, every ``RESEND_S``.
    """
    address, server_public = where
    deadline = time.monotonic() + timeout
    while True:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey, sock.curve_secretkey = keypair
        sock.connect(address)
        wait = max(0.0, min(RESEND_S, deadline - time.monotonic()))
        try:
            # never a blocking send: a DEALER with no connection blocks in send for good, and a refused
            # handshake can drop the connection before the request is queued
            sock.send(b"{}", zmq.NOBLOCK)
            if sock.poll(int(1000 * wait)):
                reply = json.loads(sock.recv())
                break
        except zmq.Again:  # no connection to queue on (dropped already): a fresh one after the pause
            time.sleep(wait)
        finally:
            sock.close(0)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for this replica's credentials from the launcher at {address} "
                               f"(it admits a replica's key once Ray returns it; is the launcher alive?)")
    if not reply.get("ok"):
        raise PermissionError(f"the launcher at {address} refused this replica's credentials: {reply.get('error')}")
    return reply["secrets"]
