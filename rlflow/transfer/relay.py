"""A relay node of the versioned channel: follows the publisher's head, pulls chunks, serves them onward.

    relay = Relay(root="ipc:///run/w", upstream="ipc:///run/w-0", serve="ipc:///run/w-1")
    head = relay.head(than=6, timeout=60)       # the newest head the publisher announced
    blob = relay.fetch("patch-7", timeout=60)    # usually already here: prefetched in the background

One background thread (the fetcher) keeps a head request parked at the publisher, and on each new head
fetches the objects marked ``prefetch`` that it lacks, one object at a time with ``window`` chunk
requests in flight to its upstream. Downstream nodes pull from this node's server (``serve``) while the
fetcher is still receiving, which is what makes a chain pipelined.

Failure handling (the publisher is the source of truth, relays are an optimisation):
- an upstream that does not answer a chunk within ``hop_timeout`` (dead, stopped, or lagging) is left
  for the rest of that object and its chunks are asked of the publisher; the next object tries the
  upstream again, so a restarted upstream is used again as soon as it is back;
- a chunk whose xxh3-64 differs from the one the publisher announced is thrown away and asked of the
  publisher (``corrupt_chunks`` counts them); the publisher's own bad chunk fails the object;
- an object the newest head no longer lists is dropped; ``fetch`` of it raises ``Gone`` (re-plan).

Trust: heads come only from the publisher's socket (a head in a reply from the upstream peer is
ignored), and with a ``ChannelKey`` only heads the key signed are adopted (``refused_heads`` counts the
rest); a head is adopted only if newer than the one held. Chunks may come from anyone: each is checked
against the checksum the (authenticated) head lists.

Threads: the fetcher owns its DEALER sockets; the server thread owns its ROUTER; the caller's thread
only waits on the shared ``ChunkStore`` condition and hands wants to the fetcher through a locked PUSH.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import zmq

from rlflow.transfer.channel import (ChannelKey, ChunkStore, Gone, Head, Inbox, Server, assemble, chunk_sum,
                                     connect_dealer, read_head, request)
from rlflow.transfer.wire import BusError, BusTimeout, ProtocolError, decode_header

HEAD_POLL_S = 5.0  # one parked head request's bound: also how soon a restarted publisher is found again
REPLY_GRACE_S = 2.0  # beyond a request's own timeout, how long a silent peer gets before it is left


class Relay:
    def __init__(self, root: str, upstream: str | None = None, serve: str | None = None, *, window: int = 4,
                 hop_timeout: float = 10.0, uplink_bytes_per_s: float = 0.0, keys_dir: str | None = None,
                 head_poll: float = HEAD_POLL_S, key: ChannelKey | None = None):
        """``key``: the channel's key: requests carry its token, only heads it signed are adopted, and
        this relay's own server serves only its holders."""
        self.root, self.upstream, self.key = root, upstream, key
        self.window, self.hop_timeout, self.keys_dir, self.head_poll = window, hop_timeout, keys_dir, head_poll
        self.store = ChunkStore()
        self.stats = {"from_upstream": 0, "from_root": 0, "corrupt_chunks": 0, "upstream_failures": 0,
                      "refused_heads": 0}
        self.refused: str | None = None  # why the last refused head was refused, for the caller's error
        self.ctx = zmq.Context.instance()
        self._wants = Inbox(self.ctx, "relay")  # keys of objects to fetch, from the server's thread and callers
        self.server = Server(serve, self.store, self._want, uplink_bytes_per_s, keys_dir, key=key) if serve else None
        self.address = self.server.address if self.server else None
        self._thread = threading.Thread(target=self._run, name="rlflow-relay", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller's side
    def head(self, than: int, timeout: float) -> Head | None:
        """The newest head above ``than``, waiting up to ``timeout``; None if none came."""
        with self.store.cond:
            self.store.cond.wait_for(lambda: self.store.head is not None and self.store.head.version > than,
                                     timeout)
            head = self.store.head
            return head if head is not None and head.version > than else None

    def ready(self, key: str) -> bool:
        """True when every chunk of ``key`` is here; otherwise asks for it (so it is fetched) and says False."""
        if self.store.complete(key):
            return True
        self._want(key)
        return False

    def fetch(self, key: str, timeout: float) -> bytes:
        """The bytes of object ``key`` of the newest head. Raises Gone (not listed) or BusTimeout."""
        store, deadline = self.store, time.monotonic() + timeout
        with store.cond:
            if store.head is None or key not in store.head.objects:
                raise Gone(key)
            if store.complete(key):
                return assemble(store, key)
            store.failed.pop(key, None)
        self._want(key)
        with store.cond:
            ok = store.cond.wait_for(lambda: store.complete(key) or key in store.failed
                                     or key not in store.head.objects, max(0.0, deadline - time.monotonic()))
            if key in store.failed:
                raise BusTimeout(f"fetching {key!r} failed: {store.failed[key]}")
            if key not in store.head.objects:
                raise Gone(key)
            if not ok:
                raise BusTimeout(f"waited {timeout:.0f}s for object {key!r} from "
                                 f"{self.upstream or self.root} (and the publisher {self.root})")
            return assemble(store, key)

    def close(self) -> None:
        self._wants.close(self._thread)
        if self.server:
            self.server.close()

    def _want(self, key: str) -> None:
        self._wants.send(key.encode())

    # ---------------------------------------------------------------- the fetcher thread
    def _run(self) -> None:
        root = connect_dealer(self.root, self.keys_dir)
        up = connect_dealer(self.upstream, self.keys_dir) if self.upstream else None
        poller = zmq.Poller()
        for s in (root, up, self._wants.sock):
            if s is not None:
                poller.register(s, zmq.POLLIN)
        queue: deque[str] = deque()  # objects to fetch, in order
        job: _Job | None = None
        head_deadline = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= head_deadline:  # (re-)park a head request at the publisher
                    known = -1 if self.store.head is None else self.store.head.version
                    root.send(request(self.key, {"op": "head", "than": known, "timeout": self.head_poll}))
                    head_deadline = now + self.head_poll + REPLY_GRACE_S
                if job is None and queue:
                    job = self._start(queue.popleft(), up)
                if job is not None:
                    job.fill(root, up)
                    if job.stalled(now):  # the upstream went quiet: the publisher serves the rest
                        self.stats["upstream_failures"] += 1
                        job.fall_back(root)
                wake = min([head_deadline] + ([job.deadline()] if job else []))
                events = dict(poller.poll(max(0, int(1000 * (wake - time.monotonic())) + 1)))
                for message in self._wants.drain() if self._wants.sock in events else ():
                    if message == Inbox.CLOSE:
                        return
                    key = message.decode()
                    if key not in queue and (job is None or job.key != key):
                        queue.append(key)
                for sock in (root, up):
                    if sock is not None and sock in events and self._drain(sock, sock is root, job, queue):
                        head_deadline = 0.0  # the parked head request was answered: park the next one
                if job is not None and job.finished():
                    job = None
                    up = self._reset_upstream(up, poller) if up is not None else None
        finally:
            for s in (root, up, self._wants.sock):
                if s is not None:
                    s.close(0)

    def _drain(self, sock, from_root: bool, job: "_Job | None", queue: deque) -> bool:
        """Handle every reply waiting on ``sock``; True if one of them answered the head request."""
        answered = False
        while sock.poll(0):
            msg = sock.recv_multipart(copy=False)
            try:
                reply = decode_header(msg[0].bytes)
            except ProtocolError:  # a broken upstream: its job times out and goes to the publisher (hop_timeout)
                continue
            if not isinstance(reply, dict):
                continue
            if reply.get("op") == "head":
                if not from_root:
                    continue  # heads come from the publisher only, whatever a peer sends
                if not reply.get("ok"):  # refused (no valid token): asked again at the next head poll, not now
                    self.stats["refused_heads"] += 1
                    self.refused = f"the publisher at {self.root} refused: {str(reply.get('error'))[:300]}"
                    continue
                answered = True
                try:
                    head = read_head(reply.get("head"), self.key, f"the publisher at {self.root}")
                except BusError as e:  # not signed with the run's key, or malformed: counted, never adopted
                    self.stats["refused_heads"] += 1
                    self.refused = str(e)
                    continue
                if head is not None:
                    self._adopt(head, queue)
            elif job is not None and reply.get("key") == job.key:
                job.reply(reply, msg[1:], from_root)
        return answered

    def _adopt(self, head: Head, queue: deque) -> None:
        """Make ``head`` the store's if it is newer; queue what it marks for prefetch and is not here yet."""
        if self.store.head is not None and head.version <= self.store.head.version:
            return
        self.store.set_head(head)
        if self.server:
            self.server.wake()
        queue.extend(k for k, info in head.objects.items()
                     if info.prefetch and k not in queue and not self.store.complete(k))

    def _start(self, key: str, up) -> "_Job | None":
        store = self.store
        with store.cond:
            if store.head is None or key not in store.head.objects or not store.begin(key):
                return None
            info = store.head.objects[key]
        return _Job(self, key, info, up)

    def _reset_upstream(self, up, poller):
        """A fresh upstream socket after each object: late replies of a left-behind peer cannot confuse."""
        poller.unregister(up)
        up.close(0)
        up = connect_dealer(self.upstream, self.keys_dir)
        poller.register(up, zmq.POLLIN)
        return up


class _Job:
    """Fetching one object: ``window`` chunk requests in flight, to the upstream or (after a failure) the root."""

    def __init__(self, relay: Relay, key: str, info, up):
        self.relay, self.key, self.info = relay, key, info
        self.use_root = up is None
        self.next = 0  # next chunk index to request
        self.retry: deque[int] = deque()  # chunks to ask of the root again
        self.inflight: dict[int, float] = {}  # chunk -> reply deadline
        self.root_attempts: dict[int, int] = {}

    def _request(self, sock, i: int, timeout: float) -> None:
        sock.send(request(self.relay.key, {"op": "chunk", "key": self.key, "i": i, "timeout": timeout}))
        self.inflight[i] = time.monotonic() + timeout + REPLY_GRACE_S

    def fill(self, root, up) -> None:
        while len(self.inflight) < self.relay.window and (self.retry or self.next < self.info.num_chunks):
            if self.retry:
                i = self.retry.popleft()
                self.root_attempts[i] = self.root_attempts.get(i, 0) + 1
                self._request(root, i, self.relay.hop_timeout)
                continue
            i, self.next = self.next, self.next + 1
            self._request(root if self.use_root else up, i, self.relay.hop_timeout)

    def stalled(self, now: float) -> bool:
        return not self.use_root and any(now >= d for d in self.inflight.values())

    def fall_back(self, root) -> None:
        self.use_root = True
        self.retry.extend(sorted(self.inflight))
        self.inflight.clear()
        self.fill(root, None)

    def deadline(self) -> float:
        return min(self.inflight.values(), default=time.monotonic() + self.relay.head_poll)

    def reply(self, reply: dict, frames: list, from_root: bool) -> None:
        i, store, stats = reply.get("i"), self.relay.store, self.relay.stats
        if not isinstance(i, int) or i not in self.inflight:
            return  # a late reply to a request already re-asked elsewhere (or nonsense from a broken peer)
        del self.inflight[i]
        if not reply.get("ok"):
            if reply.get("kind") == "Gone" and from_root:
                store.fail(self.key, "the publisher no longer lists it")
                self.next = self.info.num_chunks
                self.retry.clear()
            elif from_root and self.root_attempts.get(i, 0) >= 3:
                store.fail(self.key, f"chunk {i}: {reply.get('error')}")
            else:  # the upstream could not serve it in time: the publisher serves the rest of this object
                self.use_root = True
                self.retry.append(i)
            return
        if len(frames) != 1 or chunk_sum(frames[0].buffer) != self.info.sums[i]:
            stats["corrupt_chunks"] += 1
            if from_root and self.root_attempts.get(i, 0) >= 3:
                store.fail(self.key, f"chunk {i} from the publisher fails its checksum")
            else:
                self.retry.append(i)
            return
        stats["from_root" if from_root else "from_upstream"] += len(frames[0].buffer)
        if store.put(self.key, i, frames[0]) and self.relay.server:
            self.relay.server.wake()

    def finished(self) -> bool:
        """Complete, failed, or dropped by a newer head (all three leave nothing to wait for)."""
        store = self.relay.store
        with store.cond:
            return self.key not in store.chunks or store.complete(self.key)
