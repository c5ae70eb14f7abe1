"""The row × column table of one bus: readiness, leases, acks and capacity. No sockets, no clocks of its own.

Data model
- A *row* is one sample: a unique ``uid``, a ``group_id``, and cells in declared *columns*. A put either
  creates rows (it carries ``group_id``; every row of a group comes in that one put: groups are sealed at
  creation, so "whole group ready" is well defined) or adds columns to existing rows (it carries only
  ``uid`` and the new columns). A cell is written once: a second put of the same cell is skipped and
  counted (at-least-once producers may repeat work; the first write wins).
- A put's bytes are kept as received (one *segment*: the IPC frame and the record batch decoded from it)
  and rows point into segments per column (``seg``/``pos`` arrays), so storing never copies payload.
- A *consumer* is a name (all replicas of a role share one). Per row it has a state AVAILABLE → LEASED →
  ACKED. ``ready`` picks rows whose needed columns are present and which that consumer has not consumed.
  A lease that expires or is nacked returns its rows to AVAILABLE (at-least-once); ACKED is final, so with
  acks every row reaches every consumer exactly once. A lease may name its *holder* (a process, e.g.
  ``rollout-1``): when a supervisor knows that process is dead, ``release(holder)`` returns all its
  leases at once instead of after their deadline.
- A column put may name rows that are gone (``skip_missing``): an at-least-once producer can finish
  work on rows another replica already completed and the consumers already released. Those rows are
  skipped and counted; without the flag an unknown uid is an error (a put to a wrong id is a bug).

Bounds: every per-row array is preallocated to ``capacity_rows`` slots (freed slots are reused), and
segment bytes plus outstanding reservations never exceed ``capacity_bytes``: the table cannot outgrow
its configuration, and producers wait for room instead (the server parks their reservations).

A row is freed when every consumer named in ``release_after`` has acked it, or by ``clear``; a segment
is freed with its last referenced cell.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import operator
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from rlflow.transfer import shm
from rlflow.transfer.wire import GROUP, RESERVED_COLUMNS, UID, BusError, CapacityError, LeaseExpired, SchemaError, encode_batch

AVAILABLE, LEASED, ACKED = 0, 1, 2
MAX_COLUMNS = 64  # one bit per column in the uint64 readiness mask
MAX_CONSUMERS = 64  # each costs capacity_rows bytes of state: a flood of invented names must not exhaust memory
WHERE_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
             ">": operator.gt, ">=": operator.ge}


@dataclass
class Segment:
    """The bytes of one put, kept as received, and how many live cells still point into them."""

    batch: pa.RecordBatch
    frame: Any  # the received frame (None for shared memory); forwarded untouched when taken whole
    columns: tuple[str, ...]  # the data columns of the batch (not uid/group_id)
    nbytes: int
    refs: int = 0  # live cells pointing here
    shm: str | None = None  # the shared-memory file holding the bytes, when the producer was on this host
    pins: int = 0  # outstanding leases that handed this file's name out: it must outlive them


@dataclass
class Consumer:
    name: str
    state: np.ndarray  # [capacity_rows] uint8: AVAILABLE | LEASED | ACKED
    columns: tuple[str, ...] = ()  # the columns it last asked for (stats show its ready count)
    delivered: int = 0  # rows handed out, redeliveries included
    acked: int = 0
    redelivered: int = 0  # rows returned to AVAILABLE by an expired lease or a nack


@dataclass
class Lease:
    id: str
    consumer: str
    slots: np.ndarray  # [n] int64 row slots
    seqs: np.ndarray  # [n] int64 creation numbers: a freed and reused slot no longer matches
    deadline: float
    holder: str | None = None  # the process holding it, when the consumer named one (``release``)
    pinned: list[int] = field(default_factory=list)  # shared-memory segments named in the delivery


@dataclass
class Reservation:
    id: str
    rows: int
    nbytes: int
    deadline: float


@dataclass
class Piece:
    """A run of response rows [start, start+rows) for some columns, as one IPC frame."""

    start: int
    rows: int
    columns: list[str]
    frame: Any  # None when the piece travels as a shared-memory name
    whole: bool  # the stored bytes forwarded untouched (zero copy) rather than re-encoded
    segment: int = 0
    shm: str | None = None


class Store:
    def __init__(self, capacity_rows: int, capacity_bytes: int):
        if capacity_rows < 1 or capacity_bytes < 1:
            raise ValueError("capacity_rows and capacity_bytes must be positive")
        self.capacity_rows, self.capacity_bytes = capacity_rows, capacity_bytes
        cap = capacity_rows
        self.columns: dict[str, pa.DataType] = {}
        self.bit: dict[str, np.uint64] = {}
        self.release_after: set[str] = set()
        # per row slot
        self.alive = np.zeros(cap, bool)
        self.seq = np.zeros(cap, np.int64)
        self.group = np.zeros(cap, np.int64)
        self.present = np.zeros(cap, np.uint64)
        self.seg: dict[str, np.ndarray] = {}  # column -> [cap] int64 segment id
        self.pos: dict[str, np.ndarray] = {}  # column -> [cap] int64 row position in that segment
        self.value: dict[str, np.ndarray] = {}  # scalar numeric column -> [cap] float64 mirror for `where`
        self.uid_of = np.full(cap, None, object)  # slot -> uid
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(cap - 1, -1, -1))  # a stack: low slots are reused first
        self.top = 0  # slots >= top were never used; scans stop there
        # per group slot (a group has >= 1 row, so capacity_rows group slots always suffice)
        self.group_size = np.zeros(cap, np.int64)
        self.group_live = np.zeros(cap, np.int64)
        self.group_seq = np.zeros(cap, np.int64)
        self.group_name = np.full(cap, None, object)  # group slot -> group_id
        self.group_of: dict[str, int] = {}
        self.free_groups = list(range(cap - 1, -1, -1))
        # everything else
        self.segments: dict[int, Segment] = {}
        self.consumers: dict[str, Consumer] = {}
        self.leases: dict[str, Lease] = {}
        self.lease_heap: list[tuple[float, str]] = []
        self.reservations: dict[str, Reservation] = {}
        self.live_bytes = 0
        self.reserved_bytes = 0
        self.reserved_rows = 0
        self._ids = itertools.count(1)
        self.changes = 0  # bumped whenever rows may have become ready or room may have been freed
        self.counters = dict(puts=0, rows_in=0, cells_in=0, cells_skipped=0, rows_missing=0, rows_freed=0,
                             leases_expired=0, leases_released=0, reservations_expired=0)

    # -------------------------------------------------------------------------------------------
    # schema

    def declare(self, columns: dict[str, pa.DataType], release_after: list[str] | tuple = ()) -> None:
        """Add columns (idempotent for an equal type) and consumers whose acks free a row."""
        for name, dtype in columns.items():
            if name in RESERVED_COLUMNS:
                raise SchemaError(f"column {name!r} is reserved by the bus (row identity); rename it")
            old = self.columns.get(name)
            if old is not None and not old.equals(dtype):
                raise SchemaError(f"column {name!r} is already declared as {old}; cannot redeclare as {dtype}")
        new = [n for n in columns if n not in self.columns]
        if len(self.columns) + len(new) > MAX_COLUMNS:
            raise SchemaError(f"a bus holds at most {MAX_COLUMNS} columns; {len(self.columns)} declared, "
                              f"{len(new)} more asked: pack related fields into a struct column")
        for name in new:
            dtype = columns[name]
            self.bit[name] = np.uint64(1 << len(self.columns))
            self.columns[name] = dtype
            self.seg[name] = np.zeros(self.capacity_rows, np.int64)
            self.pos[name] = np.zeros(self.capacity_rows, np.int64)
            if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype):
                self.value[name] = np.full(self.capacity_rows, np.nan)
        self.release_after.update(release_after)

    def _mask(self, columns: list[str] | tuple[str, ...]) -> np.uint64:
        mask = np.uint64(0)
        for c in columns:
            if c not in self.bit:
                raise SchemaError(f"unknown column {c!r}; declared columns: {sorted(self.columns)}")
            mask |= self.bit[c]
        return mask

    # -------------------------------------------------------------------------------------------
    # capacity

    def fits(self, rows: int, nbytes: int) -> bool:
        return (len(self.slot_of) + self.reserved_rows + rows <= self.capacity_rows
                and self.live_bytes + self.reserved_bytes + nbytes <= self.capacity_bytes)

    def check_ever_fits(self, rows: int, nbytes: int) -> None:
        if rows > self.capacity_rows or nbytes > self.capacity_bytes:
            raise CapacityError(f"a put of {rows} rows / {nbytes} bytes can never fit this bus (capacity "
                                f"{self.capacity_rows} rows / {self.capacity_bytes} bytes): split the batch "
                                "or raise capacity_rows / capacity_bytes")

    def reserve(self, rows: int, nbytes: int, deadline: float) -> Reservation | None:
        """Hold room for a put about to be sent, or return None when it does not fit now."""
        self.check_ever_fits(rows, nbytes)
        if not self.fits(rows, nbytes):
            return None
        r = Reservation(secrets.token_hex(8), rows, nbytes, deadline)
        self.reservations[r.id] = r
        self.reserved_rows += rows
        self.reserved_bytes += nbytes
        return r

    def take_reservation(self, rid: str) -> Reservation:
        r = self.reservations.pop(rid, None)
        if r is None:
            raise CapacityError(f"reservation {rid!r} is unknown or expired; reserve again before putting")
        self.changes += 1
        self.reserved_rows -= r.rows
        self.reserved_bytes -= r.nbytes
        return r

    # -------------------------------------------------------------------------------------------
    # put

    def put(self, batch: pa.RecordBatch, frame: Any, nbytes: int, shm_name: str | None = None,
            skip_missing: bool = False) -> dict[str, int]:
        """Store one validated batch; returns counts. Raises before changing anything on bad input.

        ``skip_missing``: a column put skips rows whose uid is not on the bus (counted as ``missing``).
        """
        uids = self._uids_of(batch)
        data_columns = self._check_columns(batch.schema)
        if GROUP in batch.schema.names:
            slots, written = self._create_rows(batch, uids), None
            rows = np.arange(len(slots))
        else:
            slots, rows = self._existing_slots(uids, skip_missing)
            written = {c: (self.present[slots] & self.bit[c]) == 0 for c in data_columns}
        seg_id = next(self._ids)
        cells = 0
        for c in data_columns:
            sel = np.arange(len(slots)) if written is None else np.flatnonzero(written[c])
            target, at = slots[sel], rows[sel]  # row slots, and those rows' positions in the batch
            self.seg[c][target] = seg_id
            self.pos[c][target] = at
            self.present[target] |= self.bit[c]
            if c in self.value and len(sel):
                values = batch.column(c).take(pa.array(at)).to_numpy(zero_copy_only=False)
                self.value[c][target] = np.asarray(values, dtype=np.float64)
            cells += len(sel)
        if cells:
            self.segments[seg_id] = Segment(batch, frame, tuple(data_columns), nbytes, refs=cells, shm=shm_name)
            self.live_bytes += nbytes
        elif shm_name is not None:
            shm.unlink(shm_name)  # every cell was a repeat: nothing points into the file
        skipped = len(slots) * len(data_columns) - cells
        self.changes += 1
        self.counters["puts"] += 1
        self.counters["cells_in"] += cells
        self.counters["cells_skipped"] += skipped
        self.counters["rows_missing"] += len(uids) - len(slots)
        return {"rows": len(slots), "cells": cells, "skipped": skipped, "missing": len(uids) - len(slots)}

    def _uids_of(self, batch: pa.RecordBatch) -> list[str]:
        if UID not in batch.schema.names:
            raise SchemaError(f"a put must carry a {UID!r} string column naming each row")
        col = batch.column(UID)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise SchemaError(f"column {UID!r} must be string, got {col.type}")
        if col.null_count:
            raise SchemaError(f"column {UID!r} has {col.null_count} nulls; every row needs an id")
        uids = col.to_pylist()
        if len(set(uids)) != len(uids):
            raise SchemaError(f"column {UID!r} repeats ids within one put")
        return uids

    def _check_columns(self, schema: pa.Schema) -> list[str]:
        data_columns = [n for n in schema.names if n not in RESERVED_COLUMNS]
        if len(set(schema.names)) != len(schema.names):
            raise SchemaError(f"a put repeats a column name: {schema.names}")
        for name in data_columns:
            declared = self.columns.get(name)
            if declared is None:
                raise SchemaError(f"column {name!r} is not declared; declare it first "
                                  f"(declared: {sorted(self.columns)})")
            got = schema.field(name).type
            if not got.equals(declared):
                raise SchemaError(f"column {name!r} is declared as {declared} but the put has {got}")
        return data_columns

    def _create_rows(self, batch: pa.RecordBatch, uids: list[str]) -> np.ndarray:
        col = batch.column(GROUP)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) or col.null_count:
            raise SchemaError(f"column {GROUP!r} must be a string column without nulls, got {col.type}")
        encoded = col.dictionary_encode()  # vectorised: per-row work stays in Arrow and numpy
        names = encoded.dictionary.to_pylist()  # distinct groups, in first-seen order
        index = encoded.indices.to_numpy()  # [n] row -> position in `names`
        if not self.slot_of.keys().isdisjoint(uids):
            clash = [u for u in uids if u in self.slot_of]
            raise BusError(f"put creates rows whose uid already exists: {clash[:5]!r} ({len(clash)} in all); "
                           f"to add columns to existing rows, put without a {GROUP!r} column")
        if not self.group_of.keys().isdisjoint(names):
            old = [g for g in names if g in self.group_of]
            raise BusError(f"group {old[0]!r} already exists: all rows of a group must be created by one put")
        if len(uids) > len(self.free_slots):
            raise CapacityError(f"no room for {len(uids)} rows ({len(self.free_slots)} free slots); reserve first")
        gslots = self._take(self.free_groups, len(names))
        self.group_of.update(zip(names, gslots.tolist()))
        self.group_name[gslots] = names
        self.group_size[gslots] = self.group_live[gslots] = np.bincount(index, minlength=len(names))
        self.group_seq[gslots] = np.arange(len(names)) + next(self._ids)
        slots = self._take(self.free_slots, len(uids))
        self.uid_of[slots] = uids
        self.slot_of.update(zip(uids, slots.tolist()))
        self.group[slots] = gslots[index]
        self.top = max(self.top, int(slots.max()) + 1) if len(slots) else self.top
        first = next(self._ids) + len(names)
        self._ids = itertools.count(first + len(slots))
        self.seq[slots] = np.arange(first, first + len(slots))
        self.alive[slots] = True
        self.present[slots] = 0
        for consumer in self.consumers.values():
            consumer.state[slots] = AVAILABLE
        self.counters["rows_in"] += len(slots)
        return slots

    @staticmethod
    def _take(free: list[int], n: int) -> np.ndarray:
        """Pop ``n`` slots off a free stack."""
        taken = np.array(free[len(free) - n:][::-1], np.int64)
        del free[len(free) - n:]
        return taken

    def _existing_slots(self, uids: list[str], skip_missing: bool) -> tuple[np.ndarray, np.ndarray]:
        """(slots, their rows' positions in the put) of the uids on the bus."""
        slots = list(map(self.slot_of.get, uids))
        known = [i for i, s in enumerate(slots) if s is not None]
        if len(known) < len(uids) and not skip_missing:
            unknown = [u for u, s in zip(uids, slots) if s is None]
            raise BusError(f"put to unknown row ids {unknown[:5]!r} ({len(unknown)} of {len(uids)}): rows "
                           f"are created by a put that carries {GROUP!r}, and freed rows are gone (a producer "
                           f"that may finish work others completed puts with missing='skip')")
        return np.array([slots[i] for i in known], np.int64), np.array(known, np.int64)

    # -------------------------------------------------------------------------------------------
    # consume

    def consumer(self, name: str) -> Consumer:
        c = self.consumers.get(name)
        if c is None:
            if len(self.consumers) >= MAX_CONSUMERS:
                raise BusError(f"a bus serves at most {MAX_CONSUMERS} consumer names ({sorted(self.consumers)[:8]}...); "
                               f"{name!r} would be one more: consumers are roles, not processes")
            c = self.consumers[name] = Consumer(name, np.zeros(self.capacity_rows, np.uint8))
        return c

    def ready(self, name: str, columns: list[str], n: int, min_n: int, groups: bool,
              where: list | None = None) -> np.ndarray | None:
        """Up to ``n`` rows (or whole groups) ready for consumer ``name``, oldest first; None if < min_n."""
        consumer = self.consumer(name)
        consumer.columns = tuple(columns)
        ok = self._ready_mask(consumer, columns, where)
        slots = np.flatnonzero(ok)
        if groups:
            return self._whole_groups(slots, n, min_n)
        if len(slots) < min_n:
            return None
        if len(slots) > n:
            slots = slots[np.argpartition(self.seq[slots], n - 1)[:n]]
        return slots[np.argsort(self.seq[slots])]

    def _ready_mask(self, consumer: Consumer, columns, where) -> np.ndarray:
        top = self.top
        need = self._mask(columns)
        ok = self.alive[:top] & ((self.present[:top] & need) == need) & (consumer.state[:top] == AVAILABLE)
        for clause in where or ():
            if not (isinstance(clause, (list, tuple)) and len(clause) == 3 and clause[1] in WHERE_OPS):
                raise BusError(f"where clause {clause!r} must be [column, op, number] with op in "
                               f"{sorted(WHERE_OPS)}")
            col, op, value = clause
            if col not in self.value:
                raise SchemaError(f"where: column {col!r} is not a declared numeric scalar column "
                                  f"(filterable: {sorted(self.value)})")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BusError(f"where: value for {col!r} must be a number, got {value!r}")
            mirror = self.value[col][:top]
            ok &= WHERE_OPS[op](mirror, value) & ~np.isnan(mirror)
        return ok

    def _whole_groups(self, slots: np.ndarray, n: int, min_n: int) -> np.ndarray | None:
        g = self.group[slots]
        counts = np.bincount(g, minlength=1)
        complete = np.flatnonzero(counts == self.group_size[: len(counts)])
        complete = complete[counts[complete] > 0]
        if len(complete) < min_n:
            return None
        if len(complete) > n:
            complete = complete[np.argsort(self.group_seq[complete])[:n]]
        chosen = slots[np.isin(g, complete)]
        return chosen[np.argsort(self.seq[chosen])]

    def lease(self, name: str, slots: np.ndarray, deadline: float, holder: str | None = None) -> Lease:
        """Hand ``slots`` to consumer ``name`` until ``deadline``; ``holder`` names the process (``release``)."""
        consumer = self.consumers[name]
        consumer.state[slots] = LEASED
        consumer.delivered += len(slots)
        lease = Lease(secrets.token_hex(8), name, slots, self.seq[slots].copy(), deadline, holder)
        self.leases[lease.id] = lease
        heapq.heappush(self.lease_heap, (deadline, lease.id))
        return lease

    def _live_part(self, lease: Lease) -> np.ndarray:
        """The lease's slots that still hold the rows it was granted for (not freed meanwhile)."""
        keep = self.alive[lease.slots] & (self.seq[lease.slots] == lease.seqs)
        return lease.slots[keep]

    def _lease_of(self, name: str, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None or lease.consumer != name:
            raise LeaseExpired(f"lease {lease_id!r} of consumer {name!r} is unknown or expired (an expired "
                           "lease's rows were made available again); renew long work before it expires")
        return lease

    def ack(self, name: str, lease_id: str, uids: list[str] | None = None) -> dict[str, int]:
        """Mark a lease's rows (or the given subset) consumed; frees rows every releasing consumer acked."""
        lease = self._lease_of(name, lease_id)
        live = self._live_part(lease)
        if uids is None:
            slots = live
            self._end_lease(lease)
        else:
            if not all(isinstance(u, str) for u in uids):
                raise BusError("ack: uids must be a list of row ids (strings)")
            wanted = np.array([self.slot_of.get(u, -1) for u in uids], np.int64)
            inside = np.isin(wanted, live)
            if not inside.all():
                bad = [u for u, ok in zip(uids, inside) if not ok]
                raise BusError(f"ack names rows not held by lease {lease_id!r}: {bad[:5]!r}")
            slots = wanted
            lease.slots = live[~np.isin(live, wanted)]
            lease.seqs = self.seq[lease.slots].copy()
            if not len(lease.slots):
                self._end_lease(lease)
        consumer = self.consumers[name]
        consumer.state[slots] = ACKED
        consumer.acked += len(slots)
        return {"acked": len(slots), "freed": self._release_consumed(slots)}

    def nack(self, name: str, lease_id: str) -> int:
        lease = self._lease_of(name, lease_id)
        self._end_lease(lease)
        return self._return_rows(lease)

    def release(self, holder: str) -> dict[str, int]:
        """Return every lease ``holder`` holds, now (its process is known to be dead); rows per consumer."""
        returned: dict[str, int] = {}
        for lease in [x for x in self.leases.values() if x.holder == holder]:
            self._end_lease(lease)
            self.counters["leases_released"] += 1
            returned[lease.consumer] = returned.get(lease.consumer, 0) + self._return_rows(lease)
        return returned

    def renew(self, name: str, lease_id: str, deadline: float) -> None:
        lease = self._lease_of(name, lease_id)
        lease.deadline = deadline
        heapq.heappush(self.lease_heap, (deadline, lease.id))

    def pin(self, lease: Lease, pieces: list[Piece]) -> None:
        """Keep the shared-memory files named in a delivery until its lease ends."""
        for p in pieces:
            if p.shm is not None:
                self.segments[p.segment].pins += 1
                lease.pinned.append(p.segment)

    def _end_lease(self, lease: Lease) -> None:
        del self.leases[lease.id]
        for seg_id in lease.pinned:
            s = self.segments[seg_id]
            s.pins -= 1
            if s.refs == 0 and s.pins == 0:  # its rows were freed while the lease was out
                self._drop(seg_id)
        lease.pinned = []

    def _drop(self, seg_id: int) -> None:
        s = self.segments.pop(seg_id)
        self.live_bytes -= s.nbytes
        if s.shm is not None:
            shm.unlink(s.shm)

    def close(self) -> None:
        """Unlink every shared-memory file still held (server shutdown)."""
        for seg_id in list(self.segments):
            self._drop(seg_id)

    def _return_rows(self, lease: Lease) -> int:
        live = self._live_part(lease)
        consumer = self.consumers[lease.consumer]
        live = live[consumer.state[live] == LEASED]
        consumer.state[live] = AVAILABLE
        consumer.redelivered += len(live)
        self.changes += 1
        return len(live)

    def expire(self, now: float) -> int:
        """Return the rows of every lease past its deadline; drop expired reservations. Rows returned."""
        returned = 0
        while self.lease_heap and self.lease_heap[0][0] <= now:
            deadline, lid = heapq.heappop(self.lease_heap)
            lease = self.leases.get(lid)
            if lease is None or lease.deadline != deadline:
                continue  # acked, nacked, or renewed (a newer heap entry stands for it)
            self._end_lease(lease)
            self.counters["leases_expired"] += 1
            returned += self._return_rows(lease)
        for r in [r for r in self.reservations.values() if r.deadline <= now]:
            self.take_reservation(r.id)
            self.counters["reservations_expired"] += 1
        return returned

    def next_deadline(self) -> float | None:
        times = [d for d, lid in self.lease_heap[:1]] + [r.deadline for r in self.reservations.values()]
        return min(times) if times else None

    # -------------------------------------------------------------------------------------------
    # response pieces

    def index_batch(self, slots: np.ndarray) -> pa.RecordBatch:
        """uid and group_id of the response rows, in response order."""
        uids, groups = self.uid_of[slots], self.group_name[self.group[slots]]
        return pa.record_batch({UID: pa.array(uids, pa.string()), GROUP: pa.array(groups, pa.string())})

    def pieces(self, slots: np.ndarray, columns: list[str]) -> list[Piece]:
        """Cover ``columns`` × ``slots`` with runs of consecutive rows of one segment each.

        A run that is a whole segment with exactly its columns is forwarded as the stored frame (zero
        copy); any other run is re-encoded, copying only the bytes asked for.
        """
        runs: dict[tuple[int, int, int, int], list[str]] = {}
        for c in columns:
            seg, pos = self.seg[c][slots], self.pos[c][slots]
            breaks = np.flatnonzero((seg[1:] != seg[:-1]) | (pos[1:] != pos[:-1] + 1)) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [len(slots)]))
            for a, b in zip(starts.tolist(), ends.tolist()):
                runs.setdefault((int(seg[a]), int(pos[a]), a, b - a), []).append(c)
        out = []
        for (seg_id, first, start, rows), cols in runs.items():
            s = self.segments[seg_id]
            if first == 0 and rows == s.batch.num_rows and set(cols) == set(s.columns):
                out.append(Piece(start, rows, cols, s.frame, whole=True, segment=seg_id, shm=s.shm))
            else:
                part = s.batch.select(cols).slice(first, rows)
                out.append(Piece(start, rows, cols, encode_batch(part), whole=False, segment=seg_id))
        return out

    # -------------------------------------------------------------------------------------------
    # release

    def _release_consumed(self, slots: np.ndarray) -> int:
        if not self.release_after or not len(slots):
            return 0
        done = np.ones(len(slots), bool)
        for name in self.release_after:
            c = self.consumers.get(name)
            if c is None:
                return 0
            done &= c.state[slots] == ACKED
        return self.free(slots[done])

    def clear(self, uids: list[str] | None = None, groups: list[str] | None = None, everything: bool = False) -> int:
        """Free the named rows and every row of the named groups (or every row); unknown names are ignored.

        Leases on freed rows stay valid but cover nothing: their holders' acks free nothing and their
        puts to those rows are refused (or skipped, with ``skip_missing``)."""
        if everything:
            return self.free(np.flatnonzero(self.alive[: self.top]))
        if not all(isinstance(x, str) for x in [*(uids or ()), *(groups or ())]):
            raise BusError("clear: uids and groups must be lists of ids (strings)")
        slots = [self.slot_of[u] for u in uids or () if u in self.slot_of]
        wanted = [self.group_of[g] for g in groups or () if g in self.group_of]
        if wanted:
            top = self.top
            slots += np.flatnonzero(self.alive[:top] & np.isin(self.group[:top], wanted)).tolist()
        return self.free(np.unique(np.array(slots, np.int64)))

    def free(self, slots: np.ndarray) -> int:
        if not len(slots):
            return 0
        for c, bit in self.bit.items():
            has = slots[(self.present[slots] & bit) != 0]
            segs, counts = np.unique(self.seg[c][has], return_counts=True)
            for seg_id, k in zip(segs.tolist(), counts.tolist()):
                s = self.segments[seg_id]
                s.refs -= k
                if s.refs == 0 and s.pins == 0:
                    self._drop(seg_id)
            if c in self.value:
                self.value[c][slots] = np.nan
        collections.deque(map(self.slot_of.pop, self.uid_of[slots]), maxlen=0)  # C-speed loop
        self.uid_of[slots] = None
        self.free_slots.extend(slots.tolist())
        gs, counts = np.unique(self.group[slots], return_counts=True)
        self.group_live[gs] -= counts
        empty = gs[self.group_live[gs] == 0]
        collections.deque(map(self.group_of.pop, self.group_name[empty]), maxlen=0)
        self.group_name[empty] = None
        self.free_groups.extend(empty.tolist())
        self.alive[slots] = False
        self.present[slots] = 0
        self.counters["rows_freed"] += len(slots)
        self.changes += 1
        return len(slots)

    # -------------------------------------------------------------------------------------------
    # stats

    def stats(self) -> dict[str, Any]:
        consumers = {}
        for name, c in self.consumers.items():
            top = self.top
            state = c.state[:top][self.alive[:top]]
            ready = None
            if c.columns and all(col in self.bit for col in c.columns):
                ready = int(self._ready_mask(c, c.columns, None).sum())
            consumers[name] = dict(columns=list(c.columns), ready=ready, leased=int((state == LEASED).sum()),
                                   acked_live=int((state == ACKED).sum()), delivered=c.delivered,
                                   acked=c.acked, redelivered=c.redelivered)
        return dict(
            rows=len(self.slot_of), groups=len(self.group_of), bytes=self.live_bytes,
            capacity_rows=self.capacity_rows, capacity_bytes=self.capacity_bytes,
            reserved_rows=self.reserved_rows, reserved_bytes=self.reserved_bytes,
            segments=len(self.segments), leases=len(self.leases),
            columns={k: str(v) for k, v in self.columns.items()}, release_after=sorted(self.release_after),
            consumers=consumers, **self.counters)
