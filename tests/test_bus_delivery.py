"""Delivery semantics over real sockets: readiness, exactly-once with acks, leases, groups, filters."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pyarrow as pa
import pytest

from conftest import COLUMNS, new_rows
from helpers import wait_parked
from rlflow.transfer import BusClient, BusError, BusTimeout

SPAWN = mp.get_context("spawn")


def test_columns_from_different_producers_become_visible_only_when_all_needed_are_ready(bus_server, client):
    client.put(new_rows(4))
    with BusClient(bus_server.address) as rollout, BusClient(bus_server.address) as scorer:
        rollout.put({"uid": ["r0", "r1", "r2"], "response": [[7], [8], [9]]})
        with pytest.raises(BusTimeout, match=r"consumer 'actor'.*\['response', 'reward'\].*0 rows ready"):
            client.get("actor", ["response", "reward"], n=1, timeout=0.3)
        scorer.put({"uid": ["r1", "r2", "r3"], "reward": [1.0, 0.5, 0.0]})
    d = client.get("actor", ["response", "reward"], n=3, min_n=1, timeout=5)
    assert d.uids == ["r1", "r2"]  # r0 lacks a reward, r3 a response
    assert d.table.column("response").to_pylist() == [[8], [9]]
    assert d.table.column("reward").to_pylist() == [1.0, 0.5]


def test_a_waiting_get_is_woken_by_the_put_that_makes_rows_ready(bus_server, client):
    client.put(new_rows(2))
    t0 = time.monotonic()
    proc = SPAWN.Process(target=_put_rewards_after, args=(bus_server.address, 0.5))
    proc.start()
    d = client.get("actor", ["reward"], n=2, timeout=20)
    waited = time.monotonic() - t0
    proc.join(10)
    assert len(d) == 2 and proc.exitcode == 0
    assert waited < 10  # woken by the put, not by the 20 s timeout


def _put_rewards_after(address: str, delay: float) -> None:
    time.sleep(delay)  # the test is about a get that waits; this producer must arrive later
    with BusClient(address) as c:
        c.put({"uid": ["r0", "r1"], "reward": [1.0, 2.0]})


def _consume(address: str, consumer: str, columns: list[str], total: int, out) -> None:
    got = []
    with BusClient(address) as c:
        while True:
            try:
                d = c.get(consumer, columns, n=7, min_n=1, timeout=1.5)
            except BusTimeout:
                break  # every row was handed out; the other replica may have taken the rest
            got += d.uids
            c.ack(d)
    out.put((consumer, got))


def test_each_row_reaches_each_consumer_exactly_once_across_replicas(bus_server, client):
    total = 300
    client.put(new_rows(total, group_size=4))
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_consume, args=(bus_server.address, name, ["prompt"], total, out))
             for name in ("reward", "reward", "reference", "reference")]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    for name in ("reward", "reference"):
        uids = [u for consumer, got in results if consumer == name for u in got]
        assert sorted(uids) == sorted(f"r{i}" for i in range(total))  # none lost, none repeated
    stats = client.stats()
    assert stats["consumers"]["reward"]["acked"] == total
    assert stats["consumers"]["reward"]["redelivered"] == 0


def _take_and_hang(address: str, ready) -> None:
    with BusClient(address) as c:
        d = c.get("reward", ["prompt"], n=5, timeout=10, lease=1.0)
        ready.put(d.uids)
        time.sleep(60)  # stands for a hung worker; the test kills this process


def test_a_killed_consumers_rows_are_redelivered_after_its_lease(bus_server, client):
    client.put(new_rows(5))
    ready = SPAWN.Queue()
    proc = SPAWN.Process(target=_take_and_hang, args=(bus_server.address, ready))
    proc.start()
    taken = ready.get(timeout=30)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with pytest.raises(BusTimeout):
        client.get("reward", ["prompt"], n=5, timeout=0.2)  # still leased to the dead consumer
    d = client.get("reward", ["prompt"], n=5, timeout=10)
    assert sorted(d.uids) == sorted(taken)
    client.ack(d)
    consumer = client.stats()["consumers"]["reward"]
    assert consumer["redelivered"] == 5 and consumer["acked"] == 5 and consumer["delivered"] == 10


def test_nack_returns_rows_at_once_and_a_late_ack_after_expiry_is_refused(client):
    client.put(new_rows(3))
    d = client.get("reward", ["prompt"], n=3, timeout=5)
    assert client.nack(d) == 3
    d = client.get("reward", ["prompt"], n=3, timeout=5, lease=0.2)
    again = client.get("reward", ["prompt"], n=3, timeout=5)  # woken when the 0.2 s lease runs out
    assert again.uids == d.uids and again.lease != d.lease
    with pytest.raises(BusError, match="unknown or expired"):
        client.ack(d)
    assert client.ack(again)["acked"] == 3


def test_renewed_lease_outlives_its_first_deadline(client):
    client.put(new_rows(2))
    d = client.get("reward", ["prompt"], n=2, timeout=5, lease=0.5)
    client.renew(d, lease=30)
    with pytest.raises(BusTimeout):
        client.get("reward", ["prompt"], n=1, timeout=1.0)
    assert client.ack(d)["acked"] == 2


def test_whole_groups_only_hands_out_complete_groups(client):
    client.put(new_rows(8, group_size=4))  # groups rg0 = r0..r3, rg1 = r4..r7
    client.put({"uid": ["r0", "r1", "r2", "r3", "r4", "r5"], "reward": [1.0] * 6})
    d = client.get("actor", ["reward"], n=2, min_n=1, groups=True, timeout=5)
    assert d.uids == ["r0", "r1", "r2", "r3"]
    with pytest.raises(BusTimeout, match="1 groups ready"):
        client.get("actor", ["reward"], n=1, groups=True, timeout=0.3)
    client.put({"uid": ["r6", "r7"], "reward": [0.0, 0.0]})
    assert client.get("actor", ["reward"], n=1, groups=True, timeout=5).uids == ["r4", "r5", "r6", "r7"]


def test_where_filters_rows_on_their_version(client):
    client.put(new_rows(4, prefix="old", version=1))
    client.put(new_rows(4, prefix="new", version=3))
    d = client.get("actor", ["prompt"], n=8, min_n=1, where=[("version", ">=", 2)], timeout=5)
    assert d.uids == ["new0", "new1", "new2", "new3"]
    assert d.table.column("group_id").to_pylist()[0] == "newg0"


def test_rows_are_freed_once_every_releasing_consumer_acked(bus_server):
    with BusClient(bus_server.address) as c:
        c.declare(COLUMNS, release_after=["actor", "reward"])
        c.put(new_rows(6))
        c.ack(c.get("actor", ["prompt"], n=6, timeout=5))
        assert c.stats()["rows"] == 6  # the reward consumer still needs them
        c.ack(c.get("reward", ["prompt"], n=6, timeout=5))
        stats = c.stats()
        assert stats["rows"] == 0 and stats["bytes"] == 0 and stats["rows_freed"] == 6


def test_clear_frees_rows_and_whole_groups(client):
    client.put(new_rows(6, group_size=3))
    assert client.clear(uids=["r0"], groups=["rg1"]) == 4
    d = client.get("x", ["prompt"], n=6, min_n=1, timeout=5)
    assert d.uids == ["r1", "r2"]


def test_a_repeated_cell_is_skipped_and_counted_first_write_wins(client):
    client.put(new_rows(2))
    assert client.put({"uid": ["r0"], "reward": [1.0]})["skipped"] == 0
    assert client.put({"uid": ["r0", "r1"], "reward": [9.0, 2.0]}) == {"rows": 2, "cells": 1, "skipped": 1,
                                                                        "missing": 0}
    d = client.get("actor", ["reward"], n=2, timeout=5)
    assert d.table.column("reward").to_pylist() == [1.0, 2.0]


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_a_put_to_freed_rows_fails_unless_it_skips_missing_rows_and_then_only_they_are_skipped(bus_server,
                                                                                                shared_memory):
    with BusClient(bus_server.address, shared_memory=shared_memory) as c:
        c.declare(COLUMNS)
        c.put(new_rows(4))
        c.clear(uids=["r1", "r2"])  # e.g. completed by another replica and released
        scores = {"uid": ["r0", "r1", "r2", "r3"], "reward": [0.0, 1.0, 2.0, 3.0]}
        with pytest.raises(BusError, match="unknown row ids"):
            c.put(scores)
        assert c.put(scores, missing="skip") == {"rows": 2, "cells": 2, "skipped": 0, "missing": 2}
        d = c.get("actor", ["reward"], n=2, timeout=5)
        assert d.uids == ["r0", "r3"] and d.table.column("reward").to_pylist() == [0.0, 3.0]
        assert c.stats()["rows_missing"] == 2
        with pytest.raises(BusError, match="'missing' must be"):
            c.put(scores, missing="drop")


def test_release_returns_only_the_dead_holders_leases_at_once(bus_server):
    with BusClient(bus_server.address, holder="rollout-0") as dead, \
            BusClient(bus_server.address, holder="rollout-1") as alive:
        dead.declare(COLUMNS)
        dead.put(new_rows(6, group_size=2))
        lost = dead.get("rollout", ["prompt"], n=2, groups=True, timeout=5, lease=3600)
        kept = alive.get("rollout", ["prompt"], n=1, groups=True, timeout=5, lease=3600)
        assert len(lost) == 4 and len(kept) == 2
        assert alive.release("rollout-0") == {"rollout": 4}
        again = alive.get("rollout", ["prompt"], n=3, min_n=1, groups=True, timeout=5)
        assert sorted(again.uids) == sorted(lost.uids)  # redelivered now, not in an hour
        alive.ack(kept)  # the survivor's lease is untouched
        assert alive.release("rollout-0") == {}
        stats = alive.stats()
        assert stats["leases_released"] == 1 and stats["consumers"]["rollout"]["redelivered"] == 4


def _park_get(address: str, holder: str | None):
    """A raw client that asks for rows and never reads the answer: a process about to die."""
    import zmq

    from rlflow.transfer.wire import encode_header

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    header = {"op": "get", "id": 1, "consumer": "rollout", "columns": ["prompt"], "n": 4, "min_n": 1,
              "timeout": 600, "lease": 600}
    sock.send(encode_header({**header, **({"holder": holder} if holder else {})}))
    return sock


def test_a_released_holders_parked_get_takes_no_rows_later(client, bus_server):
    ghost = _park_get(bus_server.address, "rollout-0.0")
    wait_parked(client, 1)
    assert client.release("rollout-0.0") == {}
    client.put(new_rows(4))
    d = client.get("rollout", ["prompt"], n=4, timeout=5)  # not leased to the ghost
    assert len(d) == 4
    ghost.close()


def test_rows_leased_to_a_client_that_vanished_return_at_once(client, bus_server):
    ghost = _park_get(bus_server.address, None)
    wait_parked(client, 1)
    ghost.close()  # the process died: its parked get is answered into nothing
    client.put(new_rows(4))
    d = client.get("rollout", ["prompt"], n=4, timeout=5)  # within seconds, not the 600 s lease
    assert len(d) == 4


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_a_large_batch_round_trips_bit_exact(bus_server, shared_memory):
    import numpy as np

    client = BusClient(bus_server.address, shared_memory=shared_memory)
    client.declare(COLUMNS)
    assert client.shared_memory is shared_memory
    rng = np.random.default_rng(1)
    lengths = rng.integers(1000, 4000, 64)
    response = [rng.integers(0, 50000, n).astype(np.int32) for n in lengths]
    logprobs = [rng.standard_normal(n).astype(np.float32) for n in lengths]
    batch = {**new_rows(64), "response": pa.array(response, COLUMNS["response"]),
             "logprobs": pa.array(logprobs, COLUMNS["logprobs"])}
    client.put(batch)
    d = client.get("actor", ["logprobs", "response"], n=64, timeout=10)
    assert d.table.column_names == ["uid", "group_id", "logprobs", "response"]
    for i in (0, 31, 63):
        assert np.array_equal(d.table.column("response")[i].values.to_numpy(), response[i])
        assert np.array_equal(d.table.column("logprobs")[i].values.to_numpy(), logprobs[i])


def test_an_ack_riding_on_the_next_get_consumes_the_previous_delivery(client):
    client.put(new_rows(4))
    first = client.get("actor", ["prompt"], n=2, timeout=5)
    second = client.get("actor", ["prompt"], n=2, timeout=5, ack=first)
    assert first.uids == ["r0", "r1"] and second.uids == ["r2", "r3"]
    with pytest.raises(BusError, match="unknown or expired"):
        client.ack(first)  # already acked by the get
    consumer = client.stats()["consumers"]["actor"]
    assert consumer["acked"] == 2 and consumer["leased"] == 2


def test_a_put_in_flight_is_stored_before_the_next_call_and_its_error_is_raised_there(client):
    assert client.put(new_rows(3), wait=False) is None
    assert client.stats()["rows"] == 3  # the stats call settled the put first
    client.put(new_rows(1), wait=False)  # uid r0 again: refused by the server
    with pytest.raises(BusError, match="uid already exists"):
        client.flush()
    assert client.flush() is None and client.stats()["rows"] == 3


def test_shared_memory_files_are_unlinked_once_rows_are_freed_and_leases_end(bus_server):
    import glob

    # payloads this bus holds: it adopts a producer's file under its own pid (other runs on the host hold theirs)
    mine = f"/dev/shm/rlflow-{bus_server.process.pid}-*"
    before = set(glob.glob(mine))
    with BusClient(bus_server.address) as c:
        c.declare(COLUMNS, release_after=["actor"])
        c.put(new_rows(4))
        held = set(glob.glob(mine)) - before
        assert c.shared_memory and len(held) == 1
        logger = c.get("logger", ["prompt"], n=4, timeout=5)  # holds the file's name under its lease
        c.ack(c.get("actor", ["prompt"], n=4, timeout=5))  # frees the rows
        assert held <= set(glob.glob(mine))  # pinned by the logger's lease
        assert logger.table.column("prompt").to_pylist()[3] == [3, 4]
        c.ack(logger)
        assert not held & set(glob.glob(mine))
