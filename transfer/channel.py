"""A versioned channel: one publisher holds the newest version of a blob; subscribers wait for a newer one.

    pub = Publisher("ipc:///tmp/run/weights")          # binds; serves from a background thread
    pub.publish(3, [payload_bytes], {"checksum": ...})   # version 3 replaces version 2 for new readers
    sub = Subscriber("ipc:///tmp/run/weights")
    item = sub.wait_newer(than=2, timeout=60)            # -> Item(version=3, meta, frames)

Design decisions:
- Only the newest version is kept. A subscriber that was away for several versions gets the newest
  one, never a backlog: the memory bound is one blob, whatever the number of subscribers.
- Readiness is pushed: a ``newer`` request with nothing newer is parked and answered when a version is
  published or when its deadline passes (the reply then says ``version: null``). Nothing polls.
- ``payload=False`` asks for the version and metadata alone (a cheap "where is the publisher now?").
- Frames go out with ``copy=False``; every subscriber is served from the same buffers.

Protocol (DEALER -> ROUTER): request ``[json {"op": "newer", "than": int, "timeout": s, "payload": bool}]``,
reply ``[json {"ok": true, "version": int|null, "meta": {...}}, *frames]``.
The channel knows nothing of what the blob means; ``roles/weights.py`` puts policy weights through it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import zmq

from transfer import security
from transfer.wire import BusTimeout, ProtocolError


@dataclass
class Item:
    version: int
    meta: dict
    frames: list = field(default_factory=list)  # zmq.Frame objects; ``.buffer`` is a zero-copy view


@dataclass
class _Parked:
    identity: bytes
    than: int
    payload: bool
    deadline: float


class Publisher:
    """Binds ``address`` and serves the newest published version from a daemon thread."""

    def __init__(self, address: str, keys_dir: str | None = None, insecure: bool = False):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if not security.is_local(address):
            if keys_dir is not None:
                self._auth = security.serve_curve(self.ctx, self.sock, keys_dir)
            elif not insecure:
                raise ValueError(f"channel address {address!r} is beyond loopback: give keys_dir (CURVE) "
                                 f"or insecure=True")
        self.sock.bind(address)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        # The owner thread hands new versions to the serving thread through an inproc pair.
        inbox = f"inproc://rlflow-channel-{id(self)}"
        self._wake_in = self.ctx.socket(zmq.PAIR)
        self._wake_in.bind(inbox)
        self._wake_out = self.ctx.socket(zmq.PAIR)
        self._wake_out.connect(inbox)
        self._lock = threading.Lock()
        self._latest: Item | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="rlflow-channel", daemon=True)
        self._thread.start()

    def publish(self, version: int, frames: list, meta: dict | None = None) -> None:
        """Make ``version`` the one served; versions must increase."""
        with self._lock:
            if self._latest is not None and version <= self._latest.version:
                raise ValueError(f"version {version} is not newer than the published {self._latest.version}")
            self._latest = Item(version, dict(meta or {}), list(frames))
            self._wake_out.send(b"")

    @property
    def version(self) -> int | None:
        with self._lock:
            return None if self._latest is None else self._latest.version

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake_out.send(b"close")
        self._thread.join(10)
        self._wake_out.close(0)

    # ---------------------------------------------------------------- serving thread
    def _serve(self) -> None:
        parked: list[_Parked] = []
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        try:
            while True:
                now = time.monotonic()
                wait_ms = None if not parked else max(0, int(1000 * (min(p.deadline for p in parked) - now)) + 1)
                events = dict(poller.poll(wait_ms))
                if self._wake_in in events and self._wake_in.recv() == b"close":
                    return
                if self.sock in events:
                    while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        parked.extend(self._request(self.sock.recv_multipart(copy=False)))
                parked = self._answer(parked)
        finally:
            self.sock.close(0)
            self._wake_in.close(0)

    def _request(self, msg: list) -> list[_Parked]:
        identity = msg[0].bytes
        try:
            if len(msg) != 2:
                raise ProtocolError(f"expected one header frame, got {len(msg) - 1} frames")
            header = json.loads(msg[1].bytes)
            if header.get("op") != "newer" or not isinstance(header.get("than"), int):
                raise ProtocolError(f"expected {{'op': 'newer', 'than': int}}, got {header!r}")
            timeout = float(header.get("timeout", 0))
        except (ValueError, ProtocolError) as e:
            self._send(identity, {"ok": False, "error": str(e), "kind": "ProtocolError"})
            return []
        return [_Parked(identity, header["than"], bool(header.get("payload", True)), time.monotonic() + timeout)]

    def _answer(self, parked: list[_Parked]) -> list[_Parked]:
        with self._lock:
            latest = self._latest
        now = time.monotonic()
        keep = []
        for p in parked:
            if latest is not None and latest.version > p.than:
                frames = latest.frames if p.payload else []
                self._send(p.identity, {"ok": True, "version": latest.version, "meta": latest.meta},
                           frames=frames)
            elif now >= p.deadline:
                self._send(p.identity, {"ok": True, "version": None, "meta": {}})
            else:
                keep.append(p)
        return keep

    def _send(self, identity: bytes, header: dict, frames: list = ()) -> None:
        try:
            self.sock.send_multipart([identity, json.dumps(header).encode(), *frames], copy=False)
        except zmq.ZMQError:  # the subscriber went away (ROUTER_MANDATORY): nobody to answer
            pass


class Subscriber:
    """One DEALER to a publisher; one call in flight; use one per thread."""

    def __init__(self, address: str, keys_dir: str | None = None, reply_grace: float = 10.0):
        """``reply_grace``: how much longer than a wait's own timeout to wait for the publisher's reply."""
        self.address = address
        self.keys_dir = keys_dir
        self.reply_grace = reply_grace
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys_dir is not None:
            security.client_curve(sock, self.keys_dir)
        sock.connect(self.address)
        return sock

    def newer(self, than: int, timeout: float = 0.0, payload: bool = True) -> Item | None:
        """The newest version if it is newer than ``than``, waiting up to ``timeout``; None if none came."""
        self.sock.send_multipart([json.dumps({"op": "newer", "than": than, "timeout": timeout,
                                                   "payload": payload}).encode()])
        # The publisher answers at its deadline; the grace covers a publisher that is not there at all.
        if not self.sock.poll(int(1000 * (timeout + self.reply_grace))):
            self._reconnect()
            raise BusTimeout(f"no answer from the channel publisher at {self.address} within "
                             f"{timeout + self.reply_grace:.1f}s "
                             f"(is the publishing process alive?)")
        msg = self.sock.recv_multipart(copy=False)
        header = json.loads(msg[0].bytes)
        if not header.get("ok"):
            raise ProtocolError(header.get("error", "channel error"))
        if header["version"] is None:
            return None
        return Item(header["version"], header["meta"], list(msg[1:]))

    def wait_newer(self, than: int, timeout: float, payload: bool = True, what: str = "a newer version") -> Item:
        """Like ``newer`` but a missing version after ``timeout`` is an error that names ``what``."""
        item = self.newer(than, timeout, payload)
        if item is None:
            raise BusTimeout(f"waited {timeout:.0f}s for {what} (newer than {than}) from {self.address}")
        return item

    def _reconnect(self) -> None:
        # A late reply to an abandoned request would be mistaken for the next one's: start a fresh socket.
        self.sock.close(0)
        self.sock = self._connect()

    def close(self) -> None:
        self.sock.close(0)
