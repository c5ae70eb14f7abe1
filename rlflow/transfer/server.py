"""The bus server: one ZeroMQ ROUTER socket in front of a ``Store``, served by one thread.

```
 producers ──reserve──► [ROUTER] ──► parked reserves ──(room freed by ack/clear/expiry)──► grant
           ──put──────►    │     ──► Store.put (frame kept as received) ──► wake parked gets
 consumers ──get──────►    │     ──► Store.ready ──► lease + reply (stored frames forwarded zero-copy)
           ──ack/nack─►    │     ──► Store.ack (may free rows ──► grant parked reserves)
```

Design decisions
- One thread owns the socket and the table, so there are no locks; every request is handled to the end
  before the next. Waiting is done by *parking* the request (a get with too few ready rows, a reserve
  with too little room) and replying when a state change satisfies it or its deadline passes. Nothing
  polls on a timer: the loop sleeps in ``zmq.poll`` until a message arrives or the nearest deadline.
- Backpressure before bytes: a producer reserves rows and bytes, and only sends its payload once the
  reservation is granted, so the server's memory never exceeds ``capacity_bytes`` plus one in-flight
  message of at most ``max_message_bytes`` (ZeroMQ's MAXMSGSIZE disconnects a peer that sends more).
- Every request is answered. A malformed one gets an error reply naming the problem; an unexpected
  exception in a handler is logged with its traceback and answered as an internal error. The server
  keeps serving everyone else either way.
- Beyond loopback the server listens only with CURVE keys (authentication and encryption), unless
  the caller explicitly asks for ``insecure``.

Run one with ``rlflow bus serve`` or ``spawn_server(ServerConfig(...))`` (its own process).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from rlflow.transfer import security, shm
from rlflow.transfer.access import OPEN_OPS, Grant
from rlflow.transfer.lifetime import die_with_parent, raise_open_file_limit
from rlflow.transfer.store import Store
from rlflow.transfer.wire import (PROTOCOL_VERSION, BusError, BusTimeout, ProtocolError, decode_batch, decode_header,
                           decode_schema, encode_batch, encode_schema, encode_header, error_reply, Unauthorized)

log = logging.getLogger("rlflow.bus")

# A granted reservation is used by the very next request of its client; one that is not (the producer
# died between the two) gives its room back after this long.
RESERVATION_TTL_S = 60.0
# Parked requests are rescanned whenever rows or room appear: these bounds keep a flood of waiting
# requests (one connection pipelining them, or many connections) from slowing the bus for everyone.
# A well-behaved client has one call in flight.
MAX_PARKED_PER_PEER = 16
MAX_PARKED = 4096
# Replies queued for one peer and not yet read by it. A client has one call in flight, so a peer with
# more unread replies than this is not reading: further replies to it are dropped (and counted), never
# waited for, so what it can make the bus hold is this many replies, each bounded by what it may ask for.
REPLY_QUEUE = 64
STATS_LISTED = 50  # waiting calls a stats reply lists (oldest first; the totals count them all)


@dataclass
class ServerConfig:
    """Where a bus listens and what it may hold."""

    address: str = "tcp://127.0.0.1:0"
    """ZeroMQ endpoint: ``tcp://HOST:PORT`` (port 0 picks a free one), ``ipc:///path.sock`` (one machine),
    or ``inproc://name`` (same process, ``serve_in_thread`` only)."""
    capacity_rows: int = 65536
    """Most rows held at once; per-row bookkeeping is preallocated to this, so keep it realistic."""
    capacity_bytes: int = 2 * 1024**3
    """Most payload bytes held at once (stored puts plus granted reservations). Producers wait beyond it."""
    max_message_bytes: int = 512 * 1024**2
    """Largest payload frame accepted; a put above it is refused, a raw frame above it disconnects."""
    max_wait_seconds: float = 3600.0
    """Upper bound on any wait a client asks for (get/reserve timeouts, lease length)."""
    keys_dir: Any = None
    """CURVE key directory (``rlflow bus keygen DIR``; created on first use if missing), or the keys
    themselves (``security.CurveKeys``, held in memory). Required to listen beyond loopback; clients then
    need an authorized client key, and check the server against the key its address names (``Server.address``)."""
    insecure: bool = False
    """Allow listening beyond loopback without CURVE. Only for isolated networks."""
    grants: dict[str, Grant] | None = None
    """Token -> what its holder may do (``transfer/access.py``); None: every connection may do everything."""

    def validate(self) -> None:
        for name in ("capacity_rows", "capacity_bytes", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.address.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"ServerConfig.address {self.address!r} must start with tcp://, ipc:// or inproc://")
        if self.grants is not None and not all(isinstance(t, str) and len(t) >= 16 and isinstance(g, Grant)
                                               for t, g in self.grants.items()):
            raise ValueError("ServerConfig.grants maps tokens of at least 16 characters to Grants")
        if not security.is_local(self.address) and self.keys_dir is None and not self.insecure:
            raise ValueError(f"refusing to listen on {self.address} without CURVE keys: set keys_dir (create "
                             "keys with `rlflow bus keygen DIR`) or insecure=True on an isolated network")


class _LogBudget:
    """At most ``per_minute`` log lines a minute, then a count of what was left out: a flood of bad
    requests must not flood the log (a full pipe on stderr would block the serving thread)."""

    def __init__(self, per_minute: int = 20):
        self.per_minute, self.window, self.used, self.dropped = per_minute, time.monotonic(), 0, 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.window >= 60:
            if self.dropped:
                log.warning("bus: %d more log lines in the last minute were left out", self.dropped)
            self.window, self.used, self.dropped = now, 0, 0
        if self.used < self.per_minute:
            self.used += 1
            log.log(level, msg, *args)
        else:
            self.dropped += 1


@dataclass
class Parked:
    """A request waiting for a state change: a get for ready rows, or a reserve for room."""

    identity: bytes
    header: dict[str, Any]
    deadline: float
    since: float = field(default_factory=time.monotonic)


def _skip_missing(header: dict) -> bool:
    missing = _field(header, "missing", str, "error")
    if missing not in ("error", "skip"):
        raise ProtocolError(f"put: field 'missing' must be 'error' or 'skip', got {missing!r}")
    return missing == "skip"


def _field(header: dict, name: str, kind: type | tuple, default: Any = ...) -> Any:
    value = header.get(name, default)
    if value is ...:
        raise ProtocolError(f"request {header.get('op')!r} lacks field {name!r}")
    if value is not default and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(f"request {header.get('op')!r}: field {name!r} must be {want}, got {value!r}")
    return value


class BusServer:
    def __init__(self, config: ServerConfig, context: zmq.Context | None = None):
        config.validate()
        raise_open_file_limit()  # a descriptor per connection: a thousand peers must not abort the bus
        self.config = config
        self.store = Store(config.capacity_rows, config.capacity_bytes)
        self.ctx = context or zmq.Context.instance()
        self.gets: list[Parked] = []
        self.reserves: list[Parked] = []
        self.errors = 0
        self.dropped_replies = 0  # replies to peers that vanished or do not read (REPLY_QUEUE)
        self._log = _LogBudget()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown/vanished peer raises instead of a silent drop
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 65536)
        self.sock.setsockopt(zmq.SNDHWM, REPLY_QUEUE)
        self.auth, served_key = security.serve_curve(self.ctx, self.sock, config.keys_dir) if config.keys_dir else (None, None)
        self.sock.bind(config.address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if config.address.startswith("tcp://") and not security.is_local(config.address):
            self.address = config.address.rsplit(":", 1)[0] + ":" + self.address.rsplit(":", 1)[1]
        if served_key is not None:  # clients check this server against the key its address names
            self.address = security.pinned(self.address, served_key)
        self.shm_probe = None
        if shm.available():
            shm.sweep_dead()
            self.shm_probe = shm.write_probe(os.getpid())
        self._wake_addr = f"inproc://bus-wake-{id(self)}"
        self._wake = self.ctx.socket(zmq.PULL)
        self._wake.bind(self._wake_addr)
        self._stopping = False
        self._served = -1  # store.changes when parked calls were last tried
        self.peers: dict[bytes, Grant] = {}  # routing id -> the grant its hello named (with config.grants)
        self.handlers: dict[str, Callable] = {
            "hello": self._hello, "declare": self._declare, "reserve": self._reserve, "put": self._put,
            "get": self._get, "ack": self._ack, "nack": self._nack, "renew": self._renew, "release": self._release,
            "clear": self._clear, "stats": self._stats}

    # -------------------------------------------------------------------------------------------
    # loop

    def serve_forever(self, signal_socket: socket.socket | None = None) -> None:
        """Serve until ``stop()``; on return the sockets are closed.

        ``signal_socket`` is the read end of ``signal.set_wakeup_fd``: a signal that lands just before
        ``poll`` blocks would otherwise wait for the next deadline before its handler runs.
        """
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake, zmq.POLLIN)
        if signal_socket is not None:
            poller.register(signal_socket, zmq.POLLIN)
        try:
            while not self._stopping:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self.sock in events:
                    self._drain()
                if signal_socket is not None and signal_socket.fileno() in events:
                    signal_socket.recv(4096)  # the handler itself has run (or runs next) in this thread
                self._tick()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the serving loop to return (thread-safe: it wakes the loop through an inproc socket)."""
        self._stopping = True
        wake = self.ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_addr)
        wake.send(b"", zmq.NOBLOCK)
        wake.close()

    def close(self) -> None:
        self.store.close()
        if self.shm_probe is not None:
            shm.unlink(self.shm_probe[0])
        self.sock.close(linger=0)
        self._wake.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def _parked_deadline(self) -> float:
        return min([p.deadline for p in self.gets] + [p.deadline for p in self.reserves], default=float("inf"))

    def _poll_timeout_ms(self) -> int | None:
        deadline = min(self._parked_deadline(), self.store.next_deadline() or float("inf"))
        if deadline == float("inf"):
            return None
        return max(0, int((deadline - time.monotonic()) * 1000) + 1)

    def _drain(self) -> None:
        # a bounded burst per wake-up, so timers are still checked under a flood of requests
        for _ in range(256):
            try:
                msg = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(msg)

    def _tick(self) -> None:
        now = time.monotonic()
        self.store.expire(now)
        # Rescan waiters only when rows or room may have appeared, or one of them is due to time out.
        if self.store.changes != self._served or self._parked_deadline() <= now:
            self._serve_parked(now)

    # -------------------------------------------------------------------------------------------
    # requests

    def _handle(self, msg: list[zmq.Frame]) -> None:
        identity, header, request_id = msg[0].bytes, None, None
        try:
            if len(msg) < 2:
                raise ProtocolError("message has no header frame")
            header = decode_header(msg[1].buffer)
            request_id = header.get("id")
            op = header.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown request op {op!r}; known: {sorted(self.handlers)}")
            self._authorize(identity, op, header)
            result = handler(identity, header, msg[2:])
        except BusError as e:
            self.errors += 1
            self._send(identity, error_reply(request_id, e))
            return
        except Exception as e:  # a bug in a handler must not take the bus down for everyone
            self.errors += 1
            self._log(logging.ERROR, "bus: internal error on %s:\n%s", header, traceback.format_exc())
            self._send(identity, error_reply(request_id, RuntimeError(f"internal error: {e!r}")))
            return
        if result is not None:
            reply, frames = result
            self._send(identity, {"id": request_id, "ok": True, **reply}, frames)
        # Parked calls are served after the reply, so a producer's put never waits on consumers' gets,
        # and only when something changed: an ack or a stats call does not rescan every waiter.
        if self.store.changes != self._served:
            self._serve_parked(time.monotonic())

    def _send(self, identity: bytes, reply: dict, frames: list | tuple = ()) -> bool:
        """Send a reply; False when the peer vanished or stopped reading (the reply is dropped)."""
        try:
            self.sock.send_multipart([identity, encode_header(reply), *frames], zmq.NOBLOCK, copy=False)
            return True
        except (zmq.Again, zmq.ZMQError) as e:
            self.dropped_replies += 1
            self._log(logging.WARNING, "bus: reply to a client dropped (%s)", e)
            return False

    def _authorize(self, identity: bytes, op: str, header: dict) -> None:
        """Raise Unauthorized unless this connection's grant allows the request (see ``transfer/access.py``)."""
        if self.config.grants is None or op in OPEN_OPS:
            return
        grant = self.peers.get(identity)
        if grant is None:
            raise Unauthorized(f"{op}: this connection has no credential: say hello with a token this bus "
                               f"grants (only {', '.join(OPEN_OPS)} need none)")
        grant.check(op, header)

    def _check_put(self, identity: bytes, batch) -> None:
        if self.config.grants is not None:
            self.peers[identity].check_put(batch.schema.names)

    def _hello(self, identity, header, frames):
        token = _field(header, "token", str, None)
        if self.config.grants is not None and token is not None:
            grant = self.config.grants.get(token)
            if grant is None:
                raise Unauthorized("hello: this bus grants nothing to that token")
            self.peers[identity] = grant
        c = self.config
        reply = {"protocol": PROTOCOL_VERSION, "max_message_bytes": c.max_message_bytes,
                 "max_wait_seconds": c.max_wait_seconds}
        if self.shm_probe is not None:
            reply["shm_probe"], reply["shm_secret"] = self.shm_probe
        return reply, [encode_schema(self.store.columns)]

    def _declare(self, identity, header, frames):
        if len(frames) != 1:
            raise ProtocolError("declare carries exactly one schema frame")
        release_after = _field(header, "release_after", list, [])
        if not all(isinstance(n, str) for n in release_after):
            raise ProtocolError("declare: release_after must be a list of consumer names")
        self.store.declare(decode_schema(frames[0]), release_after)
        return {}, [encode_schema(self.store.columns)]

    def _timeout(self, header: dict, name: str = "timeout") -> float:
        t = float(_field(header, name, (int, float)))
        if not 0 <= t <= self.config.max_wait_seconds:
            raise ProtocolError(f"{name} {t} must be within [0, max_wait_seconds={self.config.max_wait_seconds}]")
        return t

    def _park(self, queue: list, identity: bytes, header: dict) -> None:
        """Park a waiting request, within the bounds on waiting requests (see MAX_PARKED)."""
        waiting = len(self.gets) + len(self.reserves)
        if waiting >= MAX_PARKED:
            raise BusError(f"the bus has {waiting} waiting requests (at most {MAX_PARKED}); retry later")
        mine = sum(p.identity == identity for p in self.gets) + sum(p.identity == identity for p in self.reserves)
        if mine >= MAX_PARKED_PER_PEER:
            raise BusError(f"this connection already has {mine} waiting requests (at most {MAX_PARKED_PER_PEER}); "
                           f"wait for their answers")
        queue.append(Parked(identity, header, time.monotonic() + self._timeout(header)))
        self._served = -1  # a new waiter: try it once now

    def _reserve(self, identity, header, frames):
        rows, nbytes = _field(header, "rows", int), _field(header, "bytes", int)
        if rows < 0 or nbytes < 0:
            raise ProtocolError("reserve: rows and bytes must be >= 0")
        if nbytes > self.config.max_message_bytes:
            raise BusError(f"a put of {nbytes} bytes exceeds max_message_bytes={self.config.max_message_bytes}; "
                           "split the batch")
        self.store.check_ever_fits(rows, nbytes)
        self._park(self.reserves, identity, header)
        return None

    def _put(self, identity, header, frames):
        _skip_missing(header)  # a bad value is refused now, not once the put got room
        name = _field(header, "shm", str, None)
        if name is None:
            if len(frames) != 1:
                raise ProtocolError(f"put carries exactly one payload frame, got {len(frames)}")
            batch = decode_batch(frames[0])
            self._check_put(identity, batch)
            return self._store_put(header, batch, frames[0], len(frames[0]), None), ()
        shm.path_of(name)  # a name of our form, before we unlink anything by it
        try:  # the file is the server's from here: every failure unlinks it
            if frames or self.shm_probe is None:
                raise ProtocolError("a shared-memory put carries no frame, and needs a bus on the same host")
            self.store.check_ever_fits(_field(header, "rows", int), _field(header, "bytes", int))
            self._park(self.reserves, identity, header)
        except BaseException:
            shm.unlink(name)
            raise
        return None

    def _put_shared(self, identity: bytes, header: dict) -> dict:
        """Adopt and store a shared-memory put that fits now."""
        name, nbytes = shm.adopt(header["shm"], os.getpid())
        try:
            batch = shm.read(name)
            self._check_put(identity, batch)
            if batch.num_rows > header["rows"] or nbytes > header["bytes"]:
                raise BusError(f"put of {batch.num_rows} rows / {nbytes} bytes exceeds the {header['rows']} rows / "
                               f"{header['bytes']} bytes it announced")
            return self.store.put(batch, None, nbytes, name, skip_missing=_skip_missing(header))
        except BaseException:
            shm.unlink(name)
            raise

    def _store_put(self, header: dict, batch, frame, nbytes: int, shm_name: str | None) -> dict:
        reservation = _field(header, "reservation", str, None)
        if reservation is not None:
            r = self.store.take_reservation(reservation)
            if nbytes > r.nbytes or batch.num_rows > r.rows:
                raise BusError(f"put of {batch.num_rows} rows / {nbytes} bytes exceeds its reservation of "
                               f"{r.rows} rows / {r.nbytes} bytes")
        elif not self.store.fits(batch.num_rows, nbytes):
            raise BusError("bus is full and this put holds no reservation; reserve rows and bytes first")
        return self.store.put(batch, frame, nbytes, shm_name, skip_missing=_skip_missing(header))

    def _get(self, identity, header, frames):
        self._parse_get(header)
        ack = _field(header, "ack", dict, None)
        if ack is not None:  # an ack riding on the next get saves the consumer a round trip
            self.store.ack(_field(ack, "consumer", str), _field(ack, "lease", str))
        self._park(self.gets, identity, header)
        return None

    def _parse_get(self, header: dict) -> None:
        _field(header, "consumer", str)
        columns = _field(header, "columns", list)
        if not all(isinstance(c, str) for c in columns):
            raise ProtocolError("get: columns must be a list of column names")
        n, min_n = _field(header, "n", int), _field(header, "min_n", int, 1)
        if not 1 <= min_n <= n:
            raise ProtocolError(f"get: need 1 <= min_n <= n, got min_n={min_n} n={n}")
        _field(header, "groups", bool, False)
        _field(header, "where", list, None)
        _field(header, "holder", str, None)
        self._timeout(header, "lease")
        self.store._mask(columns)  # unknown columns fail now, not at the first state change

    def _try_get(self, p: Parked, now: float) -> bool:
        h = p.header
        slots = self.store.ready(h["consumer"], h["columns"], h["n"], h.get("min_n", 1),
                                 h.get("groups", False), h.get("where"))
        if slots is None:
            return False
        lease = self.store.lease(h["consumer"], slots, now + h["lease"], h.get("holder"))
        pieces = self.store.pieces(slots, h["columns"])
        self.store.pin(lease, pieces)
        meta = [{"start": x.start, "rows": x.rows, "columns": x.columns, "whole": x.whole, "shm": x.shm}
                for x in pieces]
        index = encode_batch(self.store.index_batch(slots))
        reply = {"id": h.get("id"), "ok": True, "lease": lease.id, "rows": len(slots), "pieces": meta}
        if not self._send(p.identity, reply, [index, *[x.frame for x in pieces if x.shm is None]]):
            self.store.nack(h["consumer"], lease.id)  # its taker is gone: the rows are free again now
        return True

    def _try_reserve(self, p: Parked, now: float) -> bool:
        h = p.header
        if h["op"] == "put":  # a shared-memory put parked for room
            if not self.store.fits(h["rows"], h["bytes"]):
                return False
            try:
                self._send(p.identity, {"id": h.get("id"), "ok": True, **self._put_shared(p.identity, h)})
            except BusError as e:
                self._send(p.identity, error_reply(h.get("id"), e))
            return True
        r = self.store.reserve(h["rows"], h["bytes"], now + RESERVATION_TTL_S)
        if r is None:
            return False
        self._send(p.identity, {"id": h.get("id"), "ok": True, "reservation": r.id})
        return True

    def _serve_parked(self, now: float) -> None:
        self._served = self.store.changes
        # Reserves are granted strictly in arrival order, so a large put is never starved by small ones.
        while self.reserves:
            p = self.reserves[0]
            try:
                if not self._try_reserve(p, now):
                    break
            except Exception as e:  # e.g. a shared-memory file that is not what its put said
                self._internal_error(p, e)
            self.reserves.pop(0)
        for p in self.reserves:
            if p.deadline <= now:
                if p.header["op"] == "put":
                    shm.unlink(p.header["shm"])
                self._time_out(p, f"room for {p.header['rows']} rows / {p.header['bytes']} bytes "
                                  f"(held: {self.store.live_bytes} bytes, {len(self.store.slot_of)} rows)")
        self.reserves = [p for p in self.reserves if p.deadline > now]
        kept = []
        for p in self.gets:
            try:
                if self._try_get(p, now):
                    continue
                if p.deadline <= now:
                    self._time_out(p, self._waited_for(p.header))
                    continue
            except BusError as e:  # e.g. a bad `where`, found only when evaluated
                self._send(p.identity, error_reply(p.header.get("id"), e))
                continue
            except Exception as e:  # a bug must not stop the bus: answer this one, serve the rest
                self._internal_error(p, e)
                continue
            kept.append(p)
        self.gets = kept

    def _internal_error(self, p: Parked, e: Exception) -> None:
        self.errors += 1
        self._log(logging.ERROR, "bus: internal error on a parked %s:\n%s", p.header, traceback.format_exc())
        self._send(p.identity, error_reply(p.header.get("id"), RuntimeError(f"internal error: {e!r}")))

    def _waited_for(self, h: dict) -> str:
        unit = "groups" if h.get("groups") else "rows"
        ready = int(self.store._ready_mask(self.store.consumer(h["consumer"]), h["columns"], h.get("where")).sum())
        return (f"{h.get('min_n', 1)} {unit} ready for consumer {h['consumer']!r} with columns {h['columns']}"
                + (f" where {h['where']}" if h.get("where") else "") + f" ({ready} rows ready now)")

    def _time_out(self, p: Parked, what: str) -> None:
        waited = time.monotonic() - p.since
        err = BusTimeout(f"{p.header['op']} timed out after {waited:.1f}s waiting for {what}")
        self._send(p.identity, error_reply(p.header.get("id"), err))

    def _ack(self, identity, header, frames):
        uids = _field(header, "uids", list, None)
        result = self.store.ack(_field(header, "consumer", str), _field(header, "lease", str), uids)
        return result, ()

    def _nack(self, identity, header, frames):
        returned = self.store.nack(_field(header, "consumer", str), _field(header, "lease", str))
        return {"returned": returned}, ()

    def _release(self, identity, header, frames):
        """Hand back a dead holder's leases, and drop its parked gets (they would lease rows to nobody)."""
        holder = _field(header, "holder", str)
        self.gets = [p for p in self.gets if p.header.get("holder") != holder]
        return {"returned": self.store.release(holder)}, ()

    def _renew(self, identity, header, frames):
        deadline = time.monotonic() + self._timeout(header, "lease_seconds")
        self.store.renew(_field(header, "consumer", str), _field(header, "lease", str), deadline)
        return {}, ()

    def _clear(self, identity, header, frames):
        freed = self.store.clear(_field(header, "uids", list, None), _field(header, "groups", list, None),
                                 _field(header, "everything", bool, False))
        return {"freed": freed}, ()

    def _stats(self, identity, header, frames):
        now = time.monotonic()
        waiting = [{"consumer": p.header["consumer"], "n": p.header["n"], "columns": p.header["columns"],
                    "waited_s": round(now - p.since, 3)} for p in self.gets[:STATS_LISTED]]
        reserving = [{"rows": p.header["rows"], "bytes": p.header["bytes"], "waited_s": round(now - p.since, 3)}
                     for p in self.reserves[:STATS_LISTED]]
        return {"stats": {**self.store.stats(), "address": self.address, "errors": self.errors,
                          "dropped_replies": self.dropped_replies, "waiting_gets": waiting,
                          "waiting_gets_total": len(self.gets), "waiting_reserves": reserving,
                          "waiting_reserves_total": len(self.reserves)}}, ()


# -------------------------------------------------------------------------------------------------
# running a server


@dataclass
class ServerProcess:
    """Handle on a bus server running in its own process."""

    process: mp.process.BaseProcess
    address: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)


def _server_main(config: ServerConfig, conn, parent: int) -> None:
    die_with_parent(parent)  # SIGTERM: a clean stop, even when the parent was SIGKILLed
    try:
        server = BusServer(config)
    except Exception as e:  # reported to the parent, which raises it with the address it tried
        conn.send(("error", f"{e.__class__.__name__}: {e}"))
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole process group; the parent decides
    serve_until_sigterm(server, lambda: conn.send(("ok", server.address)))


def serve_until_sigterm(server: BusServer, ready=lambda: None) -> None:
    """Serve on this (main) thread until SIGTERM, then return with the sockets closed; ``ready()`` once the
    handler is in place. The signal also writes to a socket the loop polls, so one that lands just before
    the loop blocks is seen at once (without it, a bus with no deadline pending could sleep through it)."""
    signal_r, signal_w = socket.socketpair()
    signal_w.setblocking(False)
    signal.set_wakeup_fd(signal_w.fileno())
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    ready()
    server.serve_forever(signal_socket=signal_r)


def spawn_server(config: ServerConfig, timeout: float = 30.0) -> ServerProcess:
    """Start a bus server in a fresh process and wait (bounded) until it is bound."""
    ctx = mp.get_context("spawn")  # forking a process that holds a zmq context can hang
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_server_main, args=(config, child, os.getpid()), name="rlflow-bus", daemon=True)
    process.start()
    child.close()
    if not parent.poll(timeout):
        process.kill()
        raise TimeoutError(f"bus server on {config.address} did not report its address within {timeout}s "
                           f"(exit code {process.exitcode})")
    try:
        status, detail = parent.recv()
    except EOFError:
        status, detail = "error", f"the process exited with code {process.join(timeout) or process.exitcode}"
    if status != "ok":
        process.join(timeout)
        raise RuntimeError(f"bus server on {config.address} failed to start: {detail}")
    return ServerProcess(process, detail)


def serve_in_thread(config: ServerConfig) -> tuple[BusServer, threading.Thread]:
    """Run a server on a daemon thread of this process (for inproc:// and tests); ``server.stop()`` ends it."""
    server = BusServer(config)
    thread = threading.Thread(target=server.serve_forever, name="rlflow-bus", daemon=True)
    thread.start()
    return server, thread
