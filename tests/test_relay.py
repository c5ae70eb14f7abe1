"""Relays of the object channel: pipelined chains, checked chunks, and peers that die mid-transfer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import xxhash

from fuzz import pushing_heads
from rlflow.transfer.channel import Publisher, Server, ChunkStore
from rlflow.transfer.relay import Relay


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_chain_of_relays_delivers_every_byte_while_the_publisher_sends_each_about_once(short_dir):
    pub = Publisher(f"ipc://{short_dir}/root", chunk_bytes=64 << 10)
    relays = []
    for i in range(3):
        upstream = relays[-1].address if relays else None
        relays.append(Relay(pub.address, upstream, f"ipc://{short_dir}/r{i}" if i < 2 else None, hop_timeout=5))
    try:
        data = os.urandom(2 << 20)
        pub.publish(0, {"blob": data})
        assert all(r.head(-1, timeout=10) for r in relays)
        assert [r.fetch("blob", timeout=30) for r in relays] == [data] * 3
        assert pub.server.sent_bytes == len(data)  # the first relay pulled it; the others from their peers
        assert [r.stats["from_root"] for r in relays] == [len(data), 0, 0]
    finally:
        for r in relays:
            r.close()
        pub.close()


def test_objects_marked_on_demand_are_not_prefetched_but_flow_down_the_chain_when_asked(short_dir):
    pub = Publisher(f"ipc://{short_dir}/root", chunk_bytes=1 << 10)
    first = Relay(pub.address, None, f"ipc://{short_dir}/r0")
    second = Relay(pub.address, first.address)
    try:
        pub.publish(0, {"full-0": b"k" * 5000, "patch-0": b"p" * 10}, prefetch={"full-0": False})
        wait_until(lambda: first.store.complete("patch-0") and second.store.complete("patch-0"), 10, "prefetch")
        assert not first.store.complete("full-0")
        assert second.fetch("full-0", timeout=10) == b"k" * 5000
        assert first.store.complete("full-0") and second.stats["from_root"] == 0  # it came through the peer
    finally:
        second.close()
        first.close()
        pub.close()


def test_a_corrupted_chunk_from_a_peer_is_detected_and_fetched_from_the_publisher(short_dir):
    pub = Publisher(f"ipc://{short_dir}/root", chunk_bytes=1 << 10)
    data = os.urandom(8 << 10)
    head = pub.publish(0, {"blob": data}, prefetch={"blob": False})
    # A peer that announces the right head but serves flipped bytes in chunk 3.
    evil_store = ChunkStore()
    evil_store.set_head(head)
    chunks = [bytearray(data[i: i + 1024]) for i in range(0, len(data), 1024)]
    chunks[3][100] ^= 0xFF
    evil_store.hold("blob", chunks)
    evil = Server(f"ipc://{short_dir}/evil", evil_store, on_wait=lambda key: None)
    relay = Relay(pub.address, evil.address, hop_timeout=5)
    try:
        assert relay.head(-1, timeout=10)
        assert relay.fetch("blob", timeout=10) == data
        assert relay.stats["corrupt_chunks"] == 1 and relay.stats["from_root"] == 1024
    finally:
        relay.close()
        evil.close()
        pub.close()


def _relay_process(root: str, serve: str, key: str, out) -> None:
    relay = Relay(root, None, serve, uplink_bytes_per_s=4e6)
    relay.head(-1, timeout=60)
    data = relay.fetch(key, timeout=60)
    out.put(xxhash.xxh3_64_hexdigest(data))
    time.sleep(3600)  # keep serving peers until killed


def test_a_relay_killed_mid_transfer_leaves_its_peer_to_the_publisher_and_catches_up_when_restarted(short_dir):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    pub = Publisher(f"ipc://{short_dir}/root", chunk_bytes=64 << 10, uplink_bytes_per_s=4e6)  # 4 MB/s links
    serve = f"ipc://{short_dir}/r0"
    first = ctx.Process(target=_relay_process, args=(pub.address, serve, "blob-0", out), daemon=True)
    first.start()
    downstream = Relay(pub.address, serve, hop_timeout=1.0)
    restarted = None
    try:
        data = os.urandom(4 << 20)  # about 1 s per hop at 4 MB/s
        pub.publish(0, {"blob-0": data})
        wait_until(lambda: downstream.store.missing.get("blob-0", 64) < 40, 30, "the first chunks via the peer")
        os.kill(first.pid, signal.SIGKILL)
        assert downstream.fetch("blob-0", timeout=60) == data
        assert downstream.stats["upstream_failures"] >= 1
        assert downstream.stats["from_upstream"] > 0 and downstream.stats["from_root"] > 0
        restarted = ctx.Process(target=_relay_process, args=(pub.address, serve, "blob-0", out), daemon=True)
        restarted.start()
        assert out.get(timeout=60) == xxhash.xxh3_64_hexdigest(data)  # the restarted relay caught up
        before = downstream.stats["from_upstream"]
        small = os.urandom(256 << 10)
        pub.publish(1, {"blob-1": small})
        assert downstream.head(0, timeout=10)
        assert downstream.fetch("blob-1", timeout=30) == small
        assert downstream.stats["from_upstream"] > before  # and its peer uses it again
    finally:
        downstream.close()
        for p in (first, restarted):
            if p is not None and p.is_alive():
                p.kill()
        pub.close()


def test_a_relay_takes_heads_only_from_the_publisher_and_only_signed_with_the_run_key(short_dir):
    import threading

    from rlflow.transfer.channel import ChannelKey, Head, ObjectInfo

    key = ChannelKey(os.urandom(32))
    pub = Publisher(f"ipc://{short_dir}/root", chunk_bytes=1 << 10, key=key)
    forged = Head(2, {"checksum": "attacker"}, {"patch-2": ObjectInfo(14, [xxhash.xxh3_64_hexdigest(b"attacker bytes")])})
    forged.sig = ChannelKey(os.urandom(32)).sign(forged.to_json())  # signed, but not with the run's key
    stop = threading.Event()
    evil = threading.Thread(target=pushing_heads, args=(f"ipc://{short_dir}/evil", forged.to_json(), b"attacker bytes",
                                                        stop), daemon=True)
    evil.start()
    relay = Relay(pub.address, f"ipc://{short_dir}/evil", hop_timeout=2, key=key)
    impostor = Publisher(f"ipc://{short_dir}/impostor", chunk_bytes=1 << 10)  # a root that signs nothing
    fooled = Relay(impostor.address, key=key, head_poll=0.5)
    try:
        data = os.urandom(4 << 10)
        pub.publish(0, {"blob-0": data})
        assert relay.head(-1, timeout=10).version == 0
        assert relay.fetch("blob-0", timeout=20) == data  # the peer's chunks failed their checksums: the root's
        pub.publish(1, {"blob-1": data[:100]})
        assert relay.head(0, timeout=10).version == 1
        assert relay.head(1, timeout=1.0) is None  # the peer's head 2 was never adopted
        assert relay.stats["corrupt_chunks"] >= 1
        impostor.publish(5, {"patch-5": b"attacker weights"})
        assert fooled.head(-1, timeout=2.0) is None
        assert fooled.stats["refused_heads"] >= 1 and "not signed" in fooled.refused
    finally:
        stop.set()
        for r in (relay, fooled):
            r.close()
        impostor.close()
        pub.close()
