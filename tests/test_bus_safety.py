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
from helpers import rss_mb
from rlflow.transfer import BusClient, BusError, BusTimeout, SchemaError, ServerConfig, spawn_server
from rlflow.transfer.security import CurveKeys, keygen, pinned, unpin
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
    ([b"[" * 200_000 + b"]" * 200_000], "ProtocolError", "RecursionError"),  # nested past the parser's limit
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


@pytest.mark.parametrize("in_memory", [False, True], ids=["key-files", "keys-in-memory"])
def test_an_unauthenticated_client_can_neither_read_nor_write(short_dir, in_memory):
    import socket

    from rlflow.transfer.security import load_keys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = keygen(f"{short_dir}/keys")
    held = load_keys(keys) if in_memory else str(keys)  # how a run's replicas hold them: in memory
    server = spawn_server(ServerConfig(address=f"tcp://127.0.0.1:{port}", keys_dir=held))
    try:
        with BusClient(server.address, keys_dir=held) as good:
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
            raw.connect(unpin(server.address)[0])
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


def test_a_client_talks_only_to_the_server_whose_key_its_address_names(short_dir):
    """Each server of a run may hold a keypair of its own: its address names the public key, and a client
    checks the server against it. A process that knows one server's address (and so its public key) but
    listens at another's with a keypair of its own is refused by every client of that address."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    client = zmq.curve_keypair()
    real_pair, impostor_pair = zmq.curve_keypair(), zmq.curve_keypair()
    real = spawn_server(ServerConfig(address=f"tcp://127.0.0.1:{ports[0]}",
                                     keys_dir=CurveKeys(*real_pair, authorized=(client[0],))))
    impostor = spawn_server(ServerConfig(address=f"tcp://127.0.0.1:{ports[1]}",
                                         keys_dir=CurveKeys(*impostor_pair, authorized=(client[0],))))
    mine = CurveKeys(*client)  # a client key and no run-wide server key: every address must name one
    try:
        assert real.address == pinned(f"tcp://127.0.0.1:{ports[0]}", real_pair[0])
        with BusClient(real.address, keys_dir=mine, connect_timeout=10) as c:
            assert c.stats()["rows"] == 0
        posing = pinned(f"tcp://127.0.0.1:{ports[1]}", real_pair[0])  # the real key, the impostor's socket
        with pytest.raises(BusTimeout, match="CURVE keys"):
            BusClient(posing, keys_dir=mine, connect_timeout=1.5)
        with pytest.raises(ValueError, match="64 hex digits"):
            BusClient(real.address[:-2], keys_dir=mine, connect_timeout=1.5)
    finally:
        real.stop()
        impostor.stop()


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
    adopted, size = shm.adopt(first, 99999)
    assert size == len(f"payload of {first}")
    with pytest.raises(ProtocolError, match="already holds"):
        shm.adopt(second, 99999)
    assert shm.path_of(adopted).read_bytes() == f"payload of {first}".encode()
    for name in (adopted, second):
        shm.unlink(name)


def test_a_payload_name_that_is_a_symlink_or_has_a_second_name_is_refused_and_never_followed(tmp_path):
    from rlflow.transfer import shm
    from rlflow.transfer.wire import ProtocolError

    secret = tmp_path / "private"  # what a root-run bus must not serve: a file its producer could not read
    secret.write_text("secret")
    link, doubled, other = (f"rlflow-7-{c * 16}-1" for c in "bcd")
    shm.path_of(link).symlink_to(secret)
    shm.path_of(doubled).write_bytes(b"payload")
    os.link(shm.path_of(doubled), shm.path_of(other))  # a writer kept a second name to change it later
    try:
        with pytest.raises(ProtocolError, match="cannot be opened as a plain file"):
            shm.adopt(link, 99999)
        with pytest.raises(ProtocolError, match="has 2 names"):
            shm.adopt(doubled, 99999)
        assert not shm.path_of(link.replace("-7-", "-99999-")).exists()  # nothing adopted, nothing left behind
        assert not shm.path_of(doubled.replace("-7-", "-99999-")).exists() and secret.read_text() == "secret"
    finally:
        for name in (link, doubled, other):
            shm.unlink(name)


def test_the_start_up_sweep_skips_what_it_cannot_parse_or_remove_and_never_raises(short_dir):
    from rlflow.transfer import shm

    odd = [f"rlflow-{1 << 32}-{'0123456789abcdef'}-0", f"rlflow-{10 ** 40}-{'e' * 16}-0"]  # pids no process has
    dead = f"rlflow-{(1 << 22) - 3}-{'f' * 16}-0"  # a pid of ours that is not running: swept
    theirs = f"rlflow-{(1 << 22) - 4}-{'c' * 16}-0"  # another user's leftover, its process gone too
    for name in odd + [dead, theirs]:
        (shm.SHM_DIR / name).write_bytes(b"x")
    if os.geteuid() == 0:  # as root the test can make a file another user's; otherwise it is ours: swept
        os.chown(shm.SHM_DIR / theirs, 65534, 65534)
    try:
        shm.sweep_dead()
        assert [(shm.SHM_DIR / n).exists() for n in odd + [dead, theirs]] == [True, True, False, os.geteuid() == 0]
        bus = start_bus(short_dir)  # a bus starts whatever /dev/shm holds
        bus.stop()
    finally:
        for name in odd + [dead, theirs]:
            (shm.SHM_DIR / name).unlink(missing_ok=True)


def test_a_bus_started_with_a_low_open_file_limit_serves_more_peers_than_that_limit(short_dir):
    import resource

    from rlflow.transfer.lifetime import raise_open_file_limit

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this machine's hard limit on open files is {hard}: no room to show it")
    raise_open_file_limit()  # this test process holds the peers
    address = f"ipc://{short_dir}/many.sock"
    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # noqa: E731 - the usual soft limit, smaller
    bus = subprocess.Popen([sys.executable, "-m", "rlflow", "bus", "serve", "--address", address], preexec_fn=low,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peers = []
    try:
        with BusClient(address, connect_timeout=30):
            pass  # it is up
        for _ in range(600):  # each a connection, and a descriptor in the bus
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            s.send(encode_header({"op": "hello", "id": 1}))
            peers.append(s)
        deadline = time.monotonic() + 30  # one bound for all of them: a dead bus fails the test in 30 s
        answered = sum(s.poll(max(0, int(1000 * (deadline - time.monotonic())))) > 0 for s in peers)
        assert answered == 600 and bus.poll() is None, bus.stderr.read().decode()[-2000:] if bus.poll() else answered
    finally:
        for s in peers:
            s.close(0)
        bus.terminate()
        bus.wait(30)


def test_secret_key_files_are_their_owners_alone_whatever_the_umask_and_keys_travel_without_files(tmp_path):
    from pathlib import Path

    from rlflow.transfer.security import load_keys

    old = os.umask(0o022)
    try:
        d = keygen(tmp_path / "keys")
    finally:
        os.umask(old)
    secrets_ = list(Path(d).rglob("*.key_secret"))
    assert len(secrets_) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets_)
    keys = load_keys(d)  # what a replica gets in its wiring and keeps in memory: no key file where it runs
    assert keys.secret.decode() not in repr(keys) and keys.server_secret.decode() not in repr(keys)
    assert keys.public in keys.authorized


def test_each_connection_may_do_only_what_its_token_grants(short_dir):
    from rlflow.transfer import Grant, Unauthorized

    grants = {"a" * 32: Grant("admin", admin=True), "p" * 32: Grant("producer", write=("prompt",), create=True),
              "s" * 32: Grant("scorer", consumers=("scorer",), read=("prompt",), write=("score",))}
    server = start_bus(short_dir, grants=grants)
    try:
        with BusClient(server.address, token="a" * 32) as admin:
            admin.declare({**COLUMNS, "score": pa.float32()}, release_after=["scorer"])
        with BusClient(server.address, token="a" * 32) as admin, \
                BusClient(server.address, token="p" * 32) as producer, \
                BusClient(server.address, token="s" * 32) as scorer, BusClient(server.address) as stranger:
            producer.put(new_rows(4))  # creates rows: granted
            d = scorer.get("scorer", ["prompt"], n=4, timeout=5)
            scorer.put({"uid": d.uids, "score": [1.0] * len(d)})
            scorer.ack(d)
            assert stranger.stats()["rows"] == 0  # hello and stats need no token
            refused = {
                "a stranger's put": lambda: stranger.put(new_rows(1, prefix="x")),
                "a stranger's get": lambda: stranger.get("scorer", ["prompt"], n=1, timeout=0),
                "a stranger's clear": lambda: stranger.clear(everything=True),
                "the scorer creating rows": lambda: scorer.put(new_rows(1, prefix="y")),
                "the scorer writing another's column": lambda: scorer.put({"uid": ["r0"], "prompt": [[1]]}),
                "the scorer as another consumer": lambda: scorer.get("actor", ["prompt"], n=1, timeout=0),
                "the scorer reading what it may not": lambda: scorer.get("scorer", ["score"], n=1, timeout=0),
                "the scorer handing back leases": lambda: scorer.release("actor-0.0"),
                "the producer declaring": lambda: producer.declare({"x": pa.int8()}, release_after=["ghost"]),
                "the producer getting": lambda: producer.get("scorer", ["prompt"], n=1, timeout=0),
            }
            for what, call in refused.items():
                with pytest.raises(Unauthorized, match="may not|no credential"):
                    call()
                    pytest.fail(f"{what} was allowed")
            with pytest.raises(Unauthorized, match="grants nothing to that token"):
                BusClient(server.address, token="z" * 32)
            assert admin.stats()["rows"] == 0  # the scorer's ack freed every row; nothing refused changed any
    finally:
        server.stop()


def _deaf_peer(address: str) -> zmq.Socket:
    """A connection that never reads what it is sent (a receive queue of one message, a tiny kernel buffer)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(address)
    return s


def test_a_peer_that_never_reads_its_replies_holds_a_bounded_share_of_the_bus_memory(short_dir):
    """Replies queued for one peer are bounded (at most REPLY_QUEUE of them, each bounded): a peer that sends
    requests and never reads the answers once grew a bus by hundreds of MiB. The bus keeps serving others."""
    address = f"ipc://{short_dir}/deaf.sock"
    bus = subprocess.Popen([sys.executable, "-m", "rlflow", "bus", "serve", "--address", address],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiters, deaf = [], None
    try:
        with BusClient(address, connect_timeout=30) as c:
            c.declare(COLUMNS)
            for i in range(48):  # 768 parked gets: each stats reply lists the waiting calls
                w = zmq.Context.instance().socket(zmq.DEALER)
                w.setsockopt(zmq.LINGER, 0)
                w.connect(address)
                for j in range(16):
                    w.send(encode_header({"op": "get", "id": j, "consumer": f"waiter-{i}", "columns": ["prompt"],
                                          "n": 1, "timeout": 600, "lease": 60}))
                waiters.append(w)
            deadline = time.monotonic() + 30
            while c.stats()["waiting_gets_total"] < 768:
                assert time.monotonic() < deadline, "the waiting gets were never parked"
            before = rss_mb(bus.pid)
            deaf = _deaf_peer(address)
            for i in range(3000):
                deaf.send(encode_header({"op": "stats", "id": i}))
            deadline = time.monotonic() + 60  # the flood is handled at the bus's pace, interleaved with others
            while (stats := c.stats())["dropped_replies"] < 2900:
                assert time.monotonic() < deadline, f"only {stats['dropped_replies']} replies dropped"
                time.sleep(0.05)
            grown = rss_mb(bus.pid) - before
        assert grown < 40, f"the bus grew by {grown:.0f} MiB holding replies for a peer that never reads them"
        assert len(stats["waiting_gets"]) <= 50 and stats["waiting_gets_total"] == 768
    finally:
        for s in [*waiters, deaf]:
            if s is not None:
                s.close(0)
        bus.terminate()
        bus.wait(30)
