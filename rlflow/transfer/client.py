"""The bus client: declare columns, put rows, get ready rows under a lease, ack them.

One ``BusClient`` is one DEALER socket with one call in flight; use one client per thread. Every call
is bounded: it raises ``BusTimeout`` naming what it waited for when the bus does not answer in time.

    bus = BusClient("tcp://127.0.0.1:5555")
    bus.declare({"prompt_ids": pa.list_(pa.int32()), "reward": pa.float32()}, release_after=["actor"])
    bus.put(pa.table({"uid": [...], "group_id": [...], "prompt_ids": [...]}))       # creates rows
    bus.put(pa.table({"uid": [...], "reward": [...]}))                              # adds a column
    d = bus.get("actor", ["prompt_ids", "reward"], n=8, groups=True, timeout=30)    # 8 whole groups
    train_on(d.table); bus.ack(d)                                                   # consumed once
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import zmq

from rlflow.transfer import security, shm
from rlflow.transfer.wire import (GROUP, UID, BusTimeout, ProtocolError, decode_batch, decode_header, decode_schema, encode_batch,
                           encode_header, encode_schema, raise_for_reply)

REPLY_GRACE_S = 5.0  # how much longer than the server-side wait the client waits for the reply itself


@dataclass
class Delivery:
    """Rows handed to a consumer under a lease: ack them when done, or nack to hand them back now."""

    consumer: str
    lease: str
    table: pa.Table  # uid, group_id, then the asked columns in the asked order; oldest rows first
    leased_at: float = field(default_factory=time.monotonic)  # when the lease was granted or last renewed

    @property
    def uids(self) -> list[str]:
        return self.table.column(UID).to_pylist()

    def __len__(self) -> int:
        return self.table.num_rows


class BusClient:
    def __init__(self, address: str, keys_dir: str | None = None, connect_timeout: float = 10.0,
                 shared_memory: bool = True, context: zmq.Context | None = None, holder: str | None = None,
                 token: str | None = None):
        """Connect and greet the server; raises BusTimeout if no bus answers within ``connect_timeout``.

        ``shared_memory``: put payloads through /dev/shm when the server proves to be on this host
        (see ``transfer/shm.py``); False forces every payload through the socket.
        ``holder``: a name for this process that its leases carry, so that whoever supervises it can
        hand them back at once when it dies (``release``) instead of after their deadline.
        ``token``: this client's credential on a bus that grants per client (``transfer/access.py``).
        """
        self.address, self.holder = address, holder
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.connect(self.sock, address, keys_dir)
        self._ids = itertools.count(1)
        self._pending: tuple[int, dict, float] | None = None  # the put in flight: (request id, header, timeout)
        hello, frames = self._call({"op": "hello", **({"token": token} if token else {})}, timeout=connect_timeout,
                                   what="a greeting (is the bus running there, and are the CURVE keys right?)")
        self.max_message_bytes: int = hello["max_message_bytes"]
        self.columns: dict[str, pa.DataType] = decode_schema(frames[0])  # declared types, to build dict puts
        self.shared_memory = shared_memory and "shm_probe" in hello and shm.can_read_probe(
            hello["shm_probe"], hello["shm_secret"])

    def close(self) -> None:
        """Settle the put in flight (raising if it failed), then close the socket."""
        try:
            self.flush()
        finally:
            self.sock.close(linger=0)

    def __enter__(self) -> "BusClient":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: do not mask that error with the in-flight put's
            self._pending = None
            self.sock.close(linger=0)

    # -------------------------------------------------------------------------------------------

    def _call(self, header: dict, frames: list | tuple = (), timeout: float = 30.0, what: str = "a reply"):
        """Send one request and wait up to ``timeout`` for its reply; returns (reply header, frames)."""
        self.flush()  # replies come in order: settle an in-flight put first
        return self._reply(self._send(header, frames), header, timeout, what)

    def _send(self, header: dict, frames: list | tuple = ()) -> int:
        request_id = next(self._ids)
        self.sock.send_multipart([encode_header({**header, "id": request_id}), *frames], copy=False)
        return request_id

    def _reply(self, request_id: int, header: dict, timeout: float, what: str = "a reply"):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                raise BusTimeout(f"{header['op']}: no reply from the bus at {self.address} within {timeout:.1f}s "
                                 f"while waiting for {what}")
            msg = self.sock.recv_multipart(copy=False)
            reply = decode_header(msg[0].buffer)
            if reply.get("id") == request_id:  # replies to calls abandoned after a timeout are dropped
                raise_for_reply(reply)
                return reply, msg[1:]

    def declare(self, columns: dict[str, pa.DataType], release_after: list[str] | tuple = (),
                timeout: float = 30.0) -> dict[str, pa.DataType]:
        """Declare column types (idempotent); rows are freed once every ``release_after`` consumer acked them.

        Returns every column declared on the bus so far."""
        _, frames = self._call({"op": "declare", "release_after": list(release_after)},
                               [encode_schema(columns)], timeout)
        self.columns = decode_schema(frames[0])
        return self.columns

    def put(self, data: pa.RecordBatch | pa.Table | dict, timeout: float = 60.0,
            wait: bool = True, missing: str = "error") -> dict[str, int] | None:
        """Create rows (data has ``group_id``) or add columns to existing rows (data has only ``uid``).

        Waits up to ``timeout`` for room (backpressure). Returns the counts ``rows`` and ``cells`` written,
        ``skipped`` (cells already written by an earlier put: the first write wins) and ``missing``.
        ``missing="skip"``: rows no longer on the bus are skipped and counted instead of failing the put
        (for at-least-once producers: another replica may have finished those rows and they were freed).

        ``wait=False`` returns once the put is sent, so the next batch is prepared while the server stores
        this one; its outcome is checked by the next call on this client (which raises if it failed) or
        by ``flush()``. At most one put is in flight per client.
        """
        batch = _as_batch(data, self.columns)
        if self.shared_memory:
            request, header = self._put_shared(batch, timeout, missing)
        else:
            request, header = self._put_framed(batch, timeout, missing)
        self._pending = (request, header, timeout + REPLY_GRACE_S)
        return self.flush() if wait else None

    def _put_shared(self, batch: pa.RecordBatch, timeout: float, missing: str) -> tuple[int, dict]:
        # The payload is written before asking for room: it is this producer's own memory either way,
        # and the server parks the put until there is room, then adopts the file.
        size = self._checked_size(batch, shm.stream_size(batch))
        name = shm.write(batch, size)  # overlaps the server storing this client's previous put
        try:
            self.flush()
        except BaseException:
            shm.unlink(name)  # never handed over: still ours
            raise
        header = {"op": "put", "shm": name, "rows": batch.num_rows, "bytes": size, "timeout": timeout,
                  "missing": missing}
        return self._send(header), header  # from here the server owns the file and unlinks it on failure

    def _put_framed(self, batch: pa.RecordBatch, timeout: float, missing: str) -> tuple[int, dict]:
        # Bytes that cross the socket are only sent once the server has room for them.
        frame = encode_batch(batch)
        self._checked_size(batch, frame.size)
        reserve = {"op": "reserve", "rows": batch.num_rows, "bytes": frame.size, "timeout": timeout}
        reply, _ = self._call(reserve, timeout=timeout + REPLY_GRACE_S,
                              what=f"room for {batch.num_rows} rows / {frame.size} bytes")
        header = {"op": "put", "reservation": reply["reservation"], "missing": missing}
        return self._send(header, [frame]), header

    def _checked_size(self, batch: pa.RecordBatch, size: int) -> int:
        if size > self.max_message_bytes:
            raise ValueError(f"put of {batch.num_rows} rows is {size} bytes; this bus accepts at most "
                             f"{self.max_message_bytes} bytes per message (max_message_bytes): split the batch")
        return size

    def flush(self) -> dict[str, int] | None:
        """Wait for the put still in flight (``put(wait=False)``); raises its error if it failed."""
        if self._pending is None:
            return None
        request, header, timeout = self._pending
        self._pending = None
        what = f"the put of {header.get('rows', 'some')} rows to be stored"
        reply, _ = self._reply(request, header, timeout, what=what)
        return {k: reply[k] for k in ("rows", "cells", "skipped", "missing")}

    def get(self, consumer: str, columns: list[str], n: int, min_n: int | None = None, groups: bool = False,
            where: list | None = None, timeout: float = 30.0, lease: float = 60.0,
            ack: Delivery | None = None) -> Delivery:
        """Take up to ``n`` rows (whole groups if ``groups``) with ``columns`` ready that ``consumer`` has not
        consumed, waiting up to ``timeout`` until at least ``min_n`` (default ``n``) are ready.

        ``where`` filters on numeric scalar columns: ``[("version", ">=", 3)]``. The rows are leased for
        ``lease`` seconds: ack them before then (or ``renew``), or they go back to the other replicas.
        ``ack``: a previous delivery to ack in the same round trip (the ack happens even if the get
        then times out).
        """
        header = {"op": "get", "consumer": consumer, "columns": list(columns), "n": n,
                  "min_n": n if min_n is None else min_n, "groups": groups, "timeout": timeout, "lease": lease}
        if where:
            header["where"] = [list(c) for c in where]
        if self.holder is not None:
            header["holder"] = self.holder
        if ack is not None:
            header["ack"] = {"consumer": ack.consumer, "lease": ack.lease}
        reply, frames = self._call(header, timeout=timeout + REPLY_GRACE_S,
                                   what=f"{n} {'groups' if groups else 'rows'} for consumer {consumer!r}")
        return Delivery(consumer, reply["lease"], _assemble(reply, frames, list(columns)))

    def ack(self, delivery: Delivery, uids: list[str] | None = None, timeout: float = 30.0) -> dict[str, int]:
        """Mark the delivery's rows (or just ``uids`` of them) consumed for good."""
        header = {"op": "ack", "consumer": delivery.consumer, "lease": delivery.lease}
        if uids is not None:
            header["uids"] = list(uids)
        reply, _ = self._call(header, timeout=timeout)
        return {"acked": reply["acked"], "freed": reply["freed"]}

    def nack(self, delivery: Delivery, timeout: float = 30.0) -> int:
        """Hand the delivery's rows back at once (for another replica, or a retry); returns how many."""
        reply, _ = self._call({"op": "nack", "consumer": delivery.consumer, "lease": delivery.lease}, timeout=timeout)
        return reply["returned"]

    def release(self, holder: str, timeout: float = 30.0) -> dict[str, int]:
        """Hand back every lease of ``holder`` now (its process is known dead); returns rows per consumer."""
        reply, _ = self._call({"op": "release", "holder": holder}, timeout=timeout)
        return reply["returned"]

    def renew(self, delivery: Delivery, lease: float = 60.0, timeout: float = 30.0) -> None:
        """Extend the delivery's lease to ``lease`` seconds from now (long work)."""
        self._call({"op": "renew", "consumer": delivery.consumer, "lease": delivery.lease, "lease_seconds": lease},
                   timeout=timeout)
        delivery.leased_at = time.monotonic()

    def clear(self, uids: list[str] | None = None, groups: list[str] | None = None, everything: bool = False,
              timeout: float = 30.0) -> int:
        """Free rows by uid and whole groups by group id (or every row) now; returns the number of rows freed."""
        reply, _ = self._call({"op": "clear", "uids": uids, "groups": groups, "everything": everything},
                              timeout=timeout)
        return reply["freed"]

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        reply, _ = self._call({"op": "stats"}, timeout=timeout)
        return reply["stats"]


def _as_batch(data: pa.RecordBatch | pa.Table | dict, columns: dict[str, pa.DataType]) -> pa.RecordBatch:
    if isinstance(data, dict):  # plain Python values take the declared types; Arrow data is sent as it is
        types = {UID: pa.string(), GROUP: pa.string(), **columns}
        data = pa.table({k: pa.array(v, type=types.get(k)) if not isinstance(v, (pa.Array, pa.ChunkedArray))
                         else v for k, v in data.items()})
    if isinstance(data, pa.Table):
        batches = data.combine_chunks().to_batches()  # copies only a table of several chunks
        data = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=data.schema)
    if not isinstance(data, pa.RecordBatch):
        raise TypeError(f"put takes a pyarrow RecordBatch, Table or dict of columns, got {type(data).__name__}")
    return data


def _assemble(reply: dict, frames: list, columns: list[str]) -> pa.Table:
    """Rebuild the response table from the index frame and the pieces (each a run of rows × columns)."""
    pieces = reply["pieces"]
    framed = [p for p in pieces if p.get("shm") is None]
    if len(frames) != len(framed) + 1:
        raise ProtocolError(f"get reply has {len(frames)} frames for {len(framed)} framed pieces")
    index = decode_batch(frames[0])
    chunks: dict[str, list[tuple[int, pa.Array]]] = {c: [] for c in columns}
    frame_iter = iter(frames[1:])
    for meta in pieces:
        batch = shm.read(meta["shm"]) if meta.get("shm") else decode_batch(next(frame_iter))
        if meta["whole"] is False and batch.num_rows != meta["rows"]:
            raise ProtocolError(f"piece at row {meta['start']} has {batch.num_rows} rows, expected {meta['rows']}")
        for c in meta["columns"]:
            chunks[c].append((meta["start"], batch.column(c)))
    arrays = {UID: index.column(UID), GROUP: index.column(GROUP)}
    for c in columns:
        parts = sorted(chunks[c], key=lambda x: x[0])
        arrays[c] = pa.chunked_array([a for _, a in parts], type=parts[0][1].type if parts else None)
        if len(arrays[c]) != index.num_rows:
            raise ProtocolError(f"column {c!r} arrived with {len(arrays[c])} rows, expected {index.num_rows}")
    return pa.table(arrays)
