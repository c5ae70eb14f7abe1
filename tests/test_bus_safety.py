"""Bad input, backpressure and CURVE over real sockets: every fault gets its error, the server keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import zmq

from conftest import COLUMNS, new_rows, start_bus
from rlflow.transfer import BusClient, BusError, BusTimeout, SchemaError, ServerConfig, spawn_server
from rlflow.transfer.security import keygen
from rlflow.transfer.wire import encode_batch, encode_header


def raw_call(address: str, frames: list[bytes], timeout_ms: int = 5000) -> dict:
    """Send frames from a bare DEALER socket (no client library) and return the decoded reply header."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "the bus did not answer a malformed request"
        return json.loads(sock.recv_multipart()[0])
    finally:
        sock.close()


def assert_still_serves(client: BusClient) -> None:
    client.put(new_rows(1, prefix=f"alive{time.monotonic_ns()}-"))
    assert client.stats()["rows"] >= 1


@pytest.mark.parametrize("frames, kind, message", [
    ([b"\x00\xffgarbage"], "ProtocolError", "not a JSON object"),
    ([b"[1, 2]"], "ProtocolError", "must be a JSON object"),
    ([encode_header({"op": "fly", "id": 1})], "ProtocolError", "unknown request op 'fly'"),
    ([encode_header({"op": "get", "id": 1, "consumer": "a", "columns": ["prompt"], "n": "x"})],
     "ProtocolError", "field 'n' must be int"),
    ([encode_header({"op": "get", "id": 1, "consumer": "a", "columns": ["nope"], "n": 1, "timeout": 1,
                     "lease": 1})], "SchemaError", "unknown column 'nope'"),
    ([encode_header({"op": "put", "id": 1}), b"not arrow at all"], "ProtocolError", "not a valid Arrow IPC"),
    ([encode_header({"op": "put", "id": 1})], "ProtocolError", "exactly one payload frame"),
    ([encode_header({"op": "ack", "id": 1, "consumer": "a", "lease": "nope"})], "LeaseExpired", "unknown or expired"),
])
def test_each_malformed_request_gets_an_error_naming_it_and_the_server_keeps_serving(client, bus_server, frames,
                                                                                   kind, message):
    reply = raw_call(bus_server.address, frames)
    assert reply["ok"] is False and reply["kind"] == kind and message in reply["error"]
    assert_still_serves(client)


def test_a_batch_whose_types_disagree_with_the_declared_schema_is_refused_naming_the_column(client):
    bad = pa.table({"uid": ["a"], "group_id": ["g"], "prompt": pa.array([[1]], pa.list_(pa.int64()))})
    with pytest.raises(SchemaError, match=r"'prompt' is declared as list<item: int32> but the put has list<item: int64>"):
        client.put(bad)
    with pytest.raises(SchemaError, match="column 'colour' is not declared"):
        client.put({"uid": ["a"], "group_id": ["g"], "colour": [1]})
    with pytest.raises(SchemaError, match="already declared as list<item: int32>"):
        client.declare({"prompt": pa.string()})
    assert_still_serves(client)


def test_a_put_to_unknown_row_ids_is_refused_naming_them(client):
    client.put(new_rows(2))
    with pytest.raises(BusError, match=r"unknown row ids \['ghost'\] \(1 of 2\)"):
        client.put({"uid": ["r0", "ghost"], "reward": [1.0, 2.0]})
    d = client.get("actor", ["prompt"], n=2, timeout=5)
    assert "reward" not in d.table.column_names  # the refused put changed nothing
    with pytest.raises(BusError, match="uid already exists"):
        client.put(new_rows(1))
    with pytest.raises(BusError, match="group 'rg0' already exists: all rows of a group must be created by one put"):
        client.put({"uid": ["y1"], "group_id": ["rg0"], "prompt": [[1]]})


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(short_dir):
    server = start_bus(short_dir, max_message_bytes=64 * 1024)
    try:
        with BusClient(server.address) as c:
            c.declare(COLUMNS)
            big = {**new_rows(4), "response": pa.array([np.zeros(20000, np.int32)] * 4, COLUMNS["response"])}
            with pytest.raises(ValueError, match="max_message_bytes"):
                c.put(big)
            # a raw peer that ignores the limit is cut off by ZeroMQ (MAXMSGSIZE) and gets nothing stored
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.address)
            sock.send_multipart([encode_header({"op": "put", "id": 1}), b"\0" * (1 << 20)])
            assert sock.poll(500) == 0
            sock.close()
            with pytest.raises(BusError, match="exceeds max_message_bytes"):
                c._call({"op": "reserve", "rows": 1, "bytes": 1 << 20, "timeout": 1})
            assert_still_serves(c)
            assert c.stats()["rows"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_producers_block_at_capacity_and_resume_when_rows_are_freed(short_dir, shared_memory):
    server = start_bus(short_dir, capacity_rows=8)
    try:
        with BusClient(server.address, shared_memory=shared_memory) as c:
            c.declare(COLUMNS, release_after=["actor"])
            c.put(new_rows(8, prefix="a"))
            with pytest.raises(BusTimeout, match=r"(reserve|put) timed out .* room for 4 rows"):
                c.put(new_rows(4, prefix="b"), timeout=0.3)
            done = threading.Event()

            def producer():
                with BusClient(server.address, shared_memory=shared_memory) as p:
                    p.put(new_rows(4, prefix="c"), timeout=30)
                done.set()

            thread = threading.Thread(target=producer)
            thread.start()
            assert not done.wait(0.5)  # blocked: the bus holds 8 of 8 rows
            assert c.stats()["waiting_reserves"][0]["rows"] == 4
            c.ack(c.get("actor", ["prompt"], n=4, timeout=5))  # frees 4 rows
            assert done.wait(10)
            thread.join()
            stats = c.stats()
            assert stats["rows"] == 8 and stats["rows_in"] == 12
    finally:
        server.stop()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "socket"])
def test_capacity_bytes_bound_the_payload_held(short_dir, shared_memory):
    server = start_bus(short_dir, capacity_bytes=200_000)
    try:
        with BusClient(server.address, shared_memory=shared_memory) as c:
            c.declare(COLUMNS, release_after=["actor"])
            rows = lambda p: {**new_rows(4, prefix=p),
                              "response": pa.array([np.ones(10000, np.int32)] * 4, COLUMNS["response"])}
            c.put(rows("a"))
            with pytest.raises(BusTimeout):
                c.put(rows("b"), timeout=0.3)
            assert c.stats()["bytes"] <= 200_000
            with pytest.raises(BusError, match="can never fit"):
                c.put({**new_rows(12, prefix="z"),
                       "response": pa.array([np.ones(10000, np.int32)] * 12, COLUMNS["response"])})
            c.ack(c.get("actor", ["response"], n=4, timeout=5))
            c.put(rows("b"), timeout=5)
    finally:
        server.stop()


def test_an_unauthenticated_client_can_neither_read_nor_write(short_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = keygen(f"{short_dir}/keys")
    server = spawn_server(ServerConfig(address=f"tcp://127.0.0.1:{port}", keys_dir=str(keys)))
    try:
        with BusClient(server.address, keys_dir=str(keys)) as good:
            good.declare(COLUMNS)
            good.put(new_rows(2))
            with pytest.raises(BusTimeout, match="CURVE keys"):
                BusClient(server.address, connect_timeout=1.0)  # plain text: the handshake fails
            stranger = keygen(f"{short_dir}/stranger")  # a valid keypair the server never authorized
            (stranger / "server.key").unlink()
            (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
            with pytest.raises(BusTimeout):
                BusClient(server.address, keys_dir=str(stranger), connect_timeout=1.0)
            raw = zmq.Context.instance().socket(zmq.DEALER)  # a raw writer without keys stores nothing
            raw.setsockopt(zmq.LINGER, 0)
            # Once the server refuses the handshake, zmq drops the pipe and a send would block for ever
            # with no peer: bound it. Either outcome (queued and dropped, or never sent) must store nothing.
            raw.setsockopt(zmq.SNDTIMEO, 2000)
            raw.connect(server.address)
            try:
                raw.send_multipart([encode_header({"op": "put", "id": 1}),
                                    encode_batch(pa.record_batch(new_rows(1, prefix="evil")))])
            except zmq.Again:
                pass
            assert raw.poll(500) == 0
            raw.close()
            stats = good.stats()
            assert stats["rows"] == 2 and stats["rows_in"] == 2
    finally:
        server.stop()


def test_listening_beyond_loopback_without_keys_is_refused():
    with pytest.raises(ValueError, match="without CURVE keys: set keys_dir"):
        ServerConfig(address="tcp://0.0.0.0:0").validate()
    ServerConfig(address="tcp://0.0.0.0:0", insecure=True).validate()
    ServerConfig(address="tcp://127.0.0.1:0").validate()


def test_bus_stats_command_shows_rows_consumers_and_waiting_calls(client, bus_server):
    client.put(new_rows(3))
    d = client.get("reward", ["prompt"], n=2, timeout=5)
    out = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "bus", "stats", bus_server.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rows 3/65536" in out.stdout and "reward" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "bus", "stats", bus_server.address, "--json"],
                             capture_output=True, text=True, timeout=60)
    stats = json.loads(as_json.stdout)
    assert stats["consumers"]["reward"]["leased"] == 2 and stats["leases"] == 1
    client.ack(d)


def test_bus_stats_command_on_a_dead_address_says_what_it_waited_for(short_dir):
    out = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "bus", "stats", f"ipc://{short_dir}/none.sock",
                          "--timeout", "0.5"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no reply from the bus" in out.stderr


def test_a_forked_producer_names_its_payloads_apart_and_the_server_never_adopts_one_over_another():
    from rlflow.transfer import shm
    from rlflow.transfer.wire import ProtocolError

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked role process: same module state as its parent until the fork hook ran
        os.write(write, shm.new_name(4242).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    theirs, ours = os.read(read, 200).decode(), shm.new_name(4242)
    assert theirs.split("-")[2] != ours.split("-")[2]  # each process's token
    first, second = f"rlflow-1-{'a' * 16}-7", f"rlflow-2-{'a' * 16}-7"  # two producers' files, one adopted name
    for name in (first, second):
        shm.path_of(name).write_bytes(b"payload of " + name.encode())
    adopted = shm.adopt(first, 99999)
    with pytest.raises(ProtocolError, match="already holds"):
        shm.adopt(second, 99999)
    assert shm.path_of(adopted).read_bytes() == f"payload of {first}".encode()
    for name in (adopted, second):
        shm.unlink(name)
