"""A versioned, chunked object channel: one publisher holds the newest head; peers pull chunks and relay them.

    pub = Publisher("ipc:///tmp/run/weights")                       # binds; serves from a thread
    pub.publish(7, {"patch-7": blob}, meta={...}, keep=["full-5"])    # head 7 lists patch-7 and full-5
    head = Client(pub.address).head(than=6, timeout=60)              # Head(version=7, meta, objects)
    relay = Relay(pub.address, upstream=None, serve="ipc:///tmp/run/r0")   # see transfer/relay.py
    blob = relay.fetch("patch-7", timeout=60)

Design decisions:
- A **head** is a version, a small JSON ``meta`` and the objects it lists. Objects not listed by the
  newest head are dropped: the memory bound is what one head lists, whatever the number of readers.
  The channel knows nothing of what objects mean (``sync/weights.py`` puts weight patches through it).
- Objects travel in **chunks** of ``chunk_bytes``. The head carries every chunk's xxh3-64 checksum, so a
  chunk relayed by a peer is checked against what the publisher announced, not what the peer says.
- Peers pull: a reader asks its upstream (the publisher, or a relay) for chunk i of an object with
  ``window`` requests in flight. A relay answers chunks as soon as they reach it, so a chain of relays
  forwards chunk i while it receives chunk i + 1 (ECHO-2's pipelined broadcast): the publisher sends
  each byte about once and a chain of N takes about (1 + (N - 1) / K) times one transfer of K chunks.
- Readiness is pushed: a request for a head not yet published, or a chunk not yet received, is parked
  and answered when it arrives or at its deadline (then with ``kind: Timeout``). Nothing polls.
- ``uplink_bytes_per_s`` paces what a server sends, as a NIC of that bandwidth would. It exists to keep
  a shared link usable and to emulate a network on one host (benchmarks/weight_sync.py).
- A channel given a ``ChannelKey`` (a secret the publisher shares with its readers) is closed to
  everyone else: every request carries a token derived from the key (never the key itself), and every
  head is signed with it (HMAC-SHA256 of its canonical JSON). A reader with the key believes only a
  head whose signature verifies, so the chunk checksums it lists, and whatever the publisher puts in
  ``meta``, come from the publisher even when the bytes come through peers. A relay takes heads only
  from the publisher's socket, never from its upstream peer. Without a key (a channel of one's own, its
  own tests) anyone who can connect may read, as on a private socket.

Protocol (DEALER -> ROUTER), one JSON frame per request, replies ``[json, *frames]``:
  ``{"op": "head", "than": int, "timeout": s, "token"?: str}``  -> ``{"ok": true, "op": "head", "head": {..., "sig"?} | null}``
  ``{"op": "chunk", "key": str, "i": int, "timeout": s, "token"?: str}`` -> ``{"ok": true, "op": "chunk", "key", "i"}`` + chunk
  failures: ``{"ok": false, "op", "key", "i", "kind": "Gone" | "Timeout" | "ProtocolError" | "Unauthorized" | "Busy", "error": str}``
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import asdict, dataclass, field

import xxhash
import zmq

from rlflow.transfer import security
from rlflow.transfer.wire import BusTimeout, ProtocolError, Unauthorized, decode_header

CHUNK_BYTES = 1 << 20
MAX_PARKED = 1024  # waiting requests a node holds: legit peers park about window + 1 each; a flood gets "Busy"
MAX_PARKED_PER_PEER = 64  # so that one connection's flood leaves room for everyone else
MAX_WAIT_S = 3600.0
MAX_REQUEST_BYTES = 64 << 10  # a head or chunk request is a small JSON object; a bigger message is refused unread
# Replies queued for one peer and not yet read: a reader has at most ``window`` + 1 requests in flight, so
# a peer past this is not reading. Further replies to it are dropped, never waited for (a blocked send
# would stop the serving thread, and every reader with it); it holds at most this many chunks.
REPLY_QUEUE = MAX_PARKED_PER_PEER


def chunk_sum(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class ChannelKey:
    """The secret a publisher shares with its readers: it admits their requests and signs its heads.

    The key itself never travels on the channel: requests carry ``token``, an HMAC of a fixed label, and
    heads carry ``sig``, an HMAC of their canonical JSON (sorted keys, no spaces: what the publisher
    signs is what a reader re-serialises from the parsed reply). Comparisons are constant-time.
    Whoever holds the key may read and could sign; the key is for the processes of one run.
    """

    MIN_BYTES = 16

    def __init__(self, secret: bytes):
        if not isinstance(secret, bytes) or len(secret) < self.MIN_BYTES:
            raise ValueError(f"a channel key is at least {self.MIN_BYTES} random bytes (secrets.token_bytes(32))")
        self._secret = secret
        self.token = self._mac(b"rlflow-channel-read")

    def __repr__(self) -> str:
        return "ChannelKey(<secret>)"

    def _mac(self, data: bytes) -> str:
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def admits(self, token) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token, self.token)

    def sign(self, head: dict) -> str:
        """The signature of a head's JSON (``Head.to_json`` without ``sig``)."""
        body = {k: v for k, v in head.items() if k != "sig"}
        return self._mac(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    def verify(self, head) -> bool:
        return isinstance(head, dict) and isinstance(head.get("sig"), str) and hmac.compare_digest(head["sig"], self.sign(head))


@dataclass
class ObjectInfo:
    size: int  # bytes
    sums: list[str]  # xxh3-64 of each chunk, as the publisher computed it
    prefetch: bool = True  # relays fetch it as soon as it is announced (False: only when someone asks)

    @property
    def num_chunks(self) -> int:
        return len(self.sums)


@dataclass
class Head:
    version: int
    meta: dict
    objects: dict[str, ObjectInfo] = field(default_factory=dict)
    sig: str | None = None  # the publisher's signature (``ChannelKey.sign``), None on a channel without a key

    def to_json(self) -> dict:
        d = {"version": self.version, "meta": self.meta, "objects": {k: asdict(v) for k, v in self.objects.items()}}
        return d if self.sig is None else {**d, "sig": self.sig}

    @staticmethod
    def from_json(d: dict | None) -> "Head | None":
        if d is None:
            return None
        return Head(d["version"], d["meta"], {k: ObjectInfo(**v) for k, v in d["objects"].items()}, d.get("sig"))


def read_head(d, key: "ChannelKey | None", where: str) -> "Head | None":
    """The head in a reply, checked: signed with ``key`` (when given) and well formed. Raises Unauthorized
    for a head the key did not sign (or an unsigned one) and ProtocolError for a malformed one."""
    if d is None:
        return None
    if key is not None and not key.verify(d):
        raise Unauthorized(f"{where} sent a head not signed with this channel's key: refused")
    try:
        head = Head.from_json(d)
        ok = (isinstance(head.version, int) and isinstance(head.meta, dict)
              and all(isinstance(k, str) and isinstance(i.size, int) and isinstance(i.sums, list) for k, i in head.objects.items()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"{where} sent a malformed head: {type(e).__name__}: {str(e)[:200]}") from None
    if not ok:
        raise ProtocolError(f"{where} sent a malformed head (version, meta or objects of the wrong type)")
    return head


class Gone(KeyError):
    """The object is no longer (or not yet) listed by the newest head: re-read the head and re-plan."""


class ChunkStore:
    """Objects of the current head and their chunks, shared by a node's threads under one condition."""

    def __init__(self):
        self.cond = threading.Condition()
        self.head: Head | None = None
        self.chunks: dict[str, list] = {}  # key -> [chunk buffer or None] * num_chunks
        self.missing: dict[str, int] = {}  # key -> chunks still to come
        self.failed: dict[str, str] = {}  # key -> why its fetch was given up
        self.done_at: dict[str, float] = {}  # key -> wall time its last chunk arrived

    def set_head(self, head: Head) -> None:
        """Adopt ``head``; drop objects it does not list."""
        with self.cond:
            self.head = head
            for k in [k for k in self.chunks if k not in head.objects]:
                del self.chunks[k]
                self.missing.pop(k, None)
                self.done_at.pop(k, None)
            self.cond.notify_all()

    def hold(self, key: str, chunks: list) -> None:
        """Hold every chunk of ``key`` at once (the publisher's objects, complete from the start)."""
        with self.cond:
            self.chunks[key], self.missing[key] = chunks, 0

    def begin(self, key: str) -> bool:
        """Make room for ``key``'s chunks; False if it is already here or on its way."""
        with self.cond:
            if key in self.chunks:
                return False
            self.failed.pop(key, None)
            n = self.head.objects[key].num_chunks
            self.chunks[key], self.missing[key] = [None] * n, n
            return True

    def put(self, key: str, i: int, chunk) -> bool:
        with self.cond:
            slots = self.chunks.get(key)
            if slots is None or slots[i] is not None:
                return False
            slots[i] = chunk
            self.missing[key] -= 1
            if not self.missing[key]:
                self.done_at[key] = time.time()
                self.cond.notify_all()
            return True

    def fail(self, key: str, why: str) -> None:
        with self.cond:
            self.chunks.pop(key, None)
            self.missing.pop(key, None)
            self.failed[key] = why
            self.cond.notify_all()

    def chunk(self, key: str, i: int):
        with self.cond:
            slots = self.chunks.get(key)
            return None if slots is None or i >= len(slots) else slots[i]

    def complete(self, key: str) -> bool:
        with self.cond:
            return key in self.chunks and not self.missing[key]


class Inbox:
    """Messages from any thread to one polling thread, over an inproc PUSH/PULL pair.

    ZeroMQ sockets are not thread-safe: senders share the PUSH end under a lock; only the owning thread
    reads (and finally closes) ``sock``. ``close`` sends ``CLOSE`` once, waits for the owner to stop, and
    from then on ``send`` drops messages.
    """

    CLOSE = b"\0close"

    def __init__(self, ctx: zmq.Context, name: str):
        address = f"inproc://rlflow-{name}-{id(self)}"
        self.sock = ctx.socket(zmq.PULL)
        self.sock.bind(address)
        self._out = ctx.socket(zmq.PUSH)
        self._out.connect(address)
        self._lock = threading.Lock()
        self._closed = False

    def send(self, message: bytes) -> None:
        with self._lock:
            if not self._closed:
                self._out.send(message)

    def drain(self) -> list[bytes]:
        """Every message waiting (owner thread only)."""
        messages = []
        while self.sock.poll(0):
            messages.append(self.sock.recv())
        return messages

    def close(self, owner: threading.Thread, timeout: float = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._out.send(self.CLOSE)
        owner.join(timeout)
        self._out.close(0)


def request(channel_key: "ChannelKey | None", req: dict) -> bytes:
    """One request frame, carrying the key's token when the channel has one."""
    if channel_key is not None:
        req = {**req, "token": channel_key.token}
    return json.dumps(req).encode()


def connect_dealer(address: str, keys_dir: str | None = None) -> zmq.Socket:
    """A DEALER to a channel node (CURVE client keys when ``keys_dir`` is given)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.connect(sock, address, keys_dir)
    return sock


def _buffer(chunk) -> memoryview:
    return chunk.buffer if isinstance(chunk, zmq.Frame) else memoryview(chunk)


def assemble(store: ChunkStore, key: str) -> bytes:
    with store.cond:
        return b"".join(_buffer(c) for c in store.chunks[key])


@dataclass
class _Parked:
    identity: bytes
    req: dict
    deadline: float


class Server:
    """The ROUTER side of a node: answers head and chunk requests from ``store``, parking what is not there.

    ``on_wait(key)`` is called (from the serving thread) for a chunk request of an object the store does
    not hold; a relay uses it to start fetching that object. The publisher has none: unknown is Gone.
    With ``key``, only requests carrying its token are served (the rest get ``Unauthorized``).
    """

    def __init__(self, address: str, store: ChunkStore, on_wait=None, uplink_bytes_per_s: float = 0.0,
                 keys_dir: str | None = None, insecure: bool = False, key: ChannelKey | None = None):
        self.store, self.on_wait, self.key = store, on_wait, key
        self.refused = 0  # requests refused for want of the key's token
        self.dropped = 0  # replies to peers gone or not reading (REPLY_QUEUE)
        # CURVE's ZAP handler is one per context (inproc://zeromq.zap.01): a node serving beyond loopback gets
        # a context of its own, so a process can serve several channels (a rollout relaying every trainer
        # rank's shard), each with its own authenticator; it is ended with the node (``close``).
        self._auth = None
        self.own_ctx = not security.is_local(address) and keys_dir is not None
        self.ctx = zmq.Context() if self.own_ctx else zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)  # a bigger one disconnects its sender unread
        self.sock.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        served_key = None
        if not security.is_local(address):
            if keys_dir is not None:
                self._auth, served_key = security.serve_curve(self.ctx, self.sock, keys_dir)
            elif not insecure:
                raise ValueError(f"channel address {address!r} is beyond loopback: give keys_dir (CURVE) "
                                 f"or insecure=True")
        self.sock.bind(address)
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if served_key is not None:  # what the node advertises: its peers check it against this key
            self.address = security.pinned(self.address, served_key)
        self.rate = uplink_bytes_per_s
        self._next_free = 0.0  # when the paced uplink is free again
        self.sent_bytes = 0
        self._inbox = Inbox(self.ctx, "channel")  # other threads wake the serving thread: new chunks, new head
        self._thread = threading.Thread(target=self._serve, name="rlflow-channel", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._inbox.send(b"")

    def close(self) -> None:
        self._inbox.close(self._thread)
        if self._auth is not None:
            self._auth.stop()
        if self.own_ctx and not self._thread.is_alive():  # every socket of the context is closed by now
            self.ctx.term()

    def _serve(self) -> None:
        parked: list[_Parked] = []
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._inbox.sock, zmq.POLLIN)
        try:
            while True:
                wait_ms = None if not parked else max(0, int(1000 * (min(p.deadline for p in parked) - time.monotonic())) + 1)
                events = dict(poller.poll(wait_ms))
                if self._inbox.sock in events and Inbox.CLOSE in self._inbox.drain():
                    return
                if self.sock in events:
                    while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        msg = self.sock.recv_multipart(copy=False)
                        try:
                            parked += self._request(msg, parked)
                        except Exception as e:  # noqa: BLE001 - one request must never take the channel down
                            self._send(msg[0].bytes, {"ok": False, "kind": "InternalError",
                                                      "error": f"{type(e).__name__}: {str(e)[:300]}"})
                parked = [p for p in parked if not self._answer(p)]
        finally:
            self.sock.close(0)
            self._inbox.sock.close(0)

    def _request(self, msg: list, parked: list) -> list[_Parked]:
        identity = msg[0].bytes
        try:
            if len(msg) != 2:
                raise ProtocolError(f"expected one header frame, got {len(msg) - 1} frames")
            req = decode_header(msg[1].bytes)
            ok = isinstance(req, dict) and (
                (req.get("op") == "head" and isinstance(req.get("than"), int)) or
                (req.get("op") == "chunk" and isinstance(req.get("key"), str) and isinstance(req.get("i"), int)
                 and req["i"] >= 0))
            if not ok:
                raise ProtocolError(f"expected a head or chunk request, got {str(req)[:200]}")
            if self.key is not None and not self.key.admits(req.get("token")):
                self.refused += 1
                self._send(identity, {"ok": False, "op": req["op"], "kind": "Unauthorized",
                                      "error": "this channel serves only its run's readers: the request carries no "
                                               "valid token"})
                return []
            timeout = req.get("timeout", 0)
            if not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_WAIT_S:  # NaN fails too
                raise ProtocolError(f"timeout must be a number of seconds in [0, {MAX_WAIT_S:.0f}], got {timeout!r}")
            mine = sum(p.identity == identity for p in parked)
            if len(parked) >= MAX_PARKED or mine >= MAX_PARKED_PER_PEER:
                self._send(identity, {"ok": False, "kind": "Busy", "error": f"{len(parked)} requests wait here "
                                      f"({mine} of them yours; at most {MAX_PARKED}, {MAX_PARKED_PER_PEER} per peer); "
                                      f"retry later"})
                return []
            deadline = time.monotonic() + timeout
        except (ValueError, TypeError, ProtocolError) as e:  # decode_header: bad UTF-8, JSON or nesting too
            self._send(identity, {"ok": False, "kind": "ProtocolError", "error": str(e)[:500]})
            return []
        p = _Parked(identity, req, deadline)
        if req["op"] == "chunk" and self.on_wait is not None and self.store.chunk(req["key"], req["i"]) is None:
            self.on_wait(req["key"])
        return [] if self._answer(p) else [p]

    def _answer(self, p: _Parked) -> bool:
        """Answer ``p`` if its head or chunk is here, or if its deadline passed; True when answered."""
        req, store = p.req, self.store
        if req["op"] == "head":
            head = store.head
            if head is not None and head.version > req["than"]:
                return self._send(p.identity, {"ok": True, "op": "head", "head": head.to_json()})
            if time.monotonic() >= p.deadline:
                return self._send(p.identity, {"ok": True, "op": "head", "head": None})
            return False
        key, i = req["key"], req["i"]
        reply = {"op": "chunk", "key": key, "i": i}
        chunk = store.chunk(key, i)
        if chunk is not None:
            self._pace(len(_buffer(chunk)))
            return self._send(p.identity, {"ok": True, **reply}, [chunk])
        head = store.head
        if self.on_wait is None and (head is None or key not in head.objects or i >= head.objects[key].num_chunks):
            return self._send(p.identity, {"ok": False, **reply, "kind": "Gone",
                                           "error": f"object {key!r} chunk {i} is not listed by the newest head"})
        if time.monotonic() >= p.deadline:
            return self._send(p.identity, {"ok": False, **reply, "kind": "Timeout",
                                           "error": f"chunk {i} of {key!r} did not reach this relay in time"})
        return False

    def _pace(self, size: int) -> None:
        self.sent_bytes += size
        if self.rate > 0:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + size / self.rate
            time.sleep(self._next_free - now)  # the uplink is busy until this chunk has left

    def _send(self, identity: bytes, header: dict, frames: list = ()) -> bool:
        try:
            self.sock.send_multipart([identity, json.dumps(header).encode(), *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:  # gone (ROUTER_MANDATORY) or not reading (zmq.Again at REPLY_QUEUE): dropped
            self.dropped += 1
        return True


class Publisher:
    """The root of the channel: publishes heads and serves every chunk they list."""

    def __init__(self, address: str, chunk_bytes: int = CHUNK_BYTES, uplink_bytes_per_s: float = 0.0,
                 keys_dir: str | None = None, insecure: bool = False, key: ChannelKey | None = None):
        """``key``: serve only its holders and sign every head with it (see ``ChannelKey``)."""
        self.chunk_bytes, self.key = chunk_bytes, key
        self.store = ChunkStore()
        self.server = Server(address, self.store, None, uplink_bytes_per_s, keys_dir, insecure, key)
        self.address = self.server.address

    def publish(self, version: int, objects: dict[str, bytes], meta: dict | None = None, keep=(),
                prefetch: dict[str, bool] | None = None) -> Head:
        """Make head ``version`` list ``objects`` (new) plus the ``keep`` keys of earlier heads; drop the rest.

        ``prefetch[key] = False`` marks an object relays fetch only on demand. Versions must increase.
        """
        old = self.store.head
        if old is not None and version <= old.version:
            raise ValueError(f"version {version} is not newer than the published {old.version}")
        listed = {k: old.objects[k] for k in keep if old is not None and k in old.objects}
        missing = [k for k in keep if k not in listed]
        if missing:
            raise ValueError(f"cannot keep {missing}: not listed by the current head")
        chunks = {}
        for key, data in objects.items():
            view = memoryview(data).cast("B")
            parts = [view[o: o + self.chunk_bytes] for o in range(0, max(len(view), 1), self.chunk_bytes)]
            listed[key] = ObjectInfo(len(view), [chunk_sum(p) for p in parts], (prefetch or {}).get(key, True))
            chunks[key] = parts
        head = Head(version, dict(meta or {}), listed)
        if self.key is not None:
            head.sig = self.key.sign(head.to_json())
        with self.store.cond:  # chunks first, then the head that announces them
            for key, parts in chunks.items():
                self.store.hold(key, parts)
            self.store.set_head(head)
        self.server.wake()
        return head

    @property
    def version(self) -> int | None:
        head = self.store.head
        return None if head is None else head.version

    def close(self) -> None:
        self.server.close()


class Client:
    """A synchronous reader of one node (no relaying): one call in flight; use one per thread."""

    def __init__(self, address: str, keys_dir: str | None = None, reply_grace: float = 10.0,
                 key: ChannelKey | None = None):
        """``reply_grace``: how much longer than a wait's own timeout to wait for the node's reply;
        ``key``: the channel's key (requests carry its token; only heads it signed are believed)."""
        self.address, self.keys_dir, self.reply_grace, self.key = address, keys_dir, reply_grace, key
        self.sock = connect_dealer(address, keys_dir)

    def _call(self, req: dict) -> tuple[dict, list]:
        self.sock.send(request(self.key, req))
        if not self.sock.poll(int(1000 * (req["timeout"] + self.reply_grace))):
            # A late reply to an abandoned request would be mistaken for the next one's: start afresh.
            self.sock.close(0)
            self.sock = connect_dealer(self.address, self.keys_dir)
            raise BusTimeout(f"no answer from the channel at {self.address} within "
                             f"{req['timeout'] + self.reply_grace:.1f}s (is the publishing process alive?)")
        msg = self.sock.recv_multipart(copy=False)
        return decode_header(msg[0].bytes), msg[1:]

    def head(self, than: int, timeout: float = 0.0) -> Head | None:
        """The newest head if its version is above ``than``, waiting up to ``timeout``; None if none came."""
        reply, _ = self._call({"op": "head", "than": than, "timeout": timeout})
        if not reply.get("ok"):
            raise (Unauthorized if reply.get("kind") == "Unauthorized" else ProtocolError)(reply.get("error", "channel error"))
        return read_head(reply.get("head"), self.key, f"the channel at {self.address}")

    def wait_head(self, than: int, timeout: float, what: str = "a newer version") -> Head:
        head = self.head(than, timeout)
        if head is None:
            raise BusTimeout(f"waited {timeout:.0f}s for {what} (newer than {than}) from {self.address}")
        return head

    def fetch(self, head: Head, key: str, timeout: float = 60.0) -> bytes:
        """Every chunk of ``key`` (one request at a time), checked against ``head``'s checksums."""
        if key not in head.objects:
            raise Gone(key)
        info, parts = head.objects[key], []
        for i in range(info.num_chunks):
            reply, frames = self._call({"op": "chunk", "key": key, "i": i, "timeout": timeout})
            if not reply.get("ok"):
                kind = reply.get("kind")
                raise (Gone(key) if kind == "Gone" else Unauthorized(reply.get("error")) if kind == "Unauthorized"
                       else BusTimeout(reply.get("error")))
            if chunk_sum(frames[0].buffer) != info.sums[i]:
                raise ValueError(f"chunk {i} of {key!r} from {self.address} fails its checksum")
            parts.append(frames[0].buffer)
        return b"".join(parts)

    def close(self) -> None:
        self.sock.close(0)
