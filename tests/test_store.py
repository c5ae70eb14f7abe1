"""The table behind the bus, without sockets: what is copied, what is bounded, what is freed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from conftest import COLUMNS, new_rows
from rlflow.transfer.client import _as_batch
from rlflow.transfer.store import Store
from rlflow.transfer.wire import decode_batch, encode_batch


def put(store: Store, data: dict) -> None:
    frame = encode_batch(_as_batch(data, COLUMNS))
    store.put(decode_batch(frame), frame, frame.size)


def big_rows(prefix: str, n: int = 16) -> dict:
    return {**new_rows(n, prefix=prefix),
            "response": pa.array([np.arange(1000, dtype=np.int32)] * n, COLUMNS["response"])}


def test_a_consumer_taking_a_whole_put_gets_the_stored_frame_itself():
    store = Store(64, 1 << 24)
    store.declare(COLUMNS)
    put(store, big_rows("a"))
    slots = store.ready("c", ["prompt", "response"], n=16, min_n=16, groups=False)
    (piece,) = store.pieces(slots, ["prompt", "response"])
    assert piece.whole and piece.frame is next(iter(store.segments.values())).frame


def test_a_partial_take_reencodes_only_the_rows_and_columns_asked_for():
    store = Store(64, 1 << 24)
    store.declare(COLUMNS)
    put(store, big_rows("a"))
    full = next(iter(store.segments.values())).nbytes
    slots = store.ready("c", ["response"], n=2, min_n=2, groups=False)
    (piece,) = store.pieces(slots, ["response"])
    assert not piece.whole and piece.frame.size < full / 4  # 2 of 16 rows
    assert decode_batch(piece.frame).column("response").to_pylist()[1] == list(range(1000))


def test_rows_from_several_puts_are_covered_by_one_piece_per_run():
    store = Store(64, 1 << 24)
    store.declare(COLUMNS)
    put(store, new_rows(4, prefix="a"))
    put(store, new_rows(4, prefix="b"))
    put(store, {"uid": ["a1", "a2", "b0"], "reward": pa.array([1, 2, 3], pa.float32())})
    slots = store.ready("c", ["prompt", "reward"], n=8, min_n=1, groups=False)
    pieces = store.pieces(slots, ["prompt", "reward"])
    covered = {(p.start, p.rows, tuple(p.columns)) for p in pieces}
    assert covered == {(0, 2, ("prompt",)), (2, 1, ("prompt",)), (0, 3, ("reward",))}


def test_freed_slots_are_reused_so_bookkeeping_never_grows_past_capacity():
    store = Store(8, 1 << 24)
    store.declare(COLUMNS, release_after=["c"])
    for round_ in range(50):
        put(store, new_rows(8, prefix=f"x{round_}-"))
        slots = store.ready("c", ["prompt"], n=8, min_n=8, groups=False)
        lease = store.lease("c", slots, deadline=1e9)
        assert store.ack("c", lease.id)["freed"] == 8
    assert store.top == 8 and len(store.segments) == 0 and store.live_bytes == 0
    assert len(store.free_slots) == 8 and len(store.group_of) == 0
