"""The versioned object channel: heads, chunks, retention, parked waits, bounded waits."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from rlflow.transfer.channel import Client, Gone, Publisher


@pytest.fixture
def channel(short_dir):
    pub = Publisher(f"ipc://{short_dir}/ch", chunk_bytes=1000)
    client = Client(pub.address)
    yield pub, client
    client.close()
    pub.close()


def test_a_head_wait_with_nothing_newer_returns_none_at_its_deadline(channel):
    pub, client = channel
    t0 = time.monotonic()
    assert client.head(-1, timeout=0.3) is None
    assert 0.25 < time.monotonic() - t0 < 5


def test_a_parked_head_wait_is_answered_when_a_version_is_published(channel):
    pub, client = channel
    threading.Timer(0.2, pub.publish, args=(0, {"w0": b"x"}, {"note": "first"})).start()
    head = client.wait_head(-1, timeout=10)
    assert (head.version, head.meta, list(head.objects)) == (0, {"note": "first"}, ["w0"])


def test_an_object_travels_in_checked_chunks_and_reassembles_exactly(channel):
    pub, client = channel
    data = os.urandom(4500)
    pub.publish(0, {"blob": data})
    head = client.head(-1)
    assert head.objects["blob"].num_chunks == 5 and head.objects["blob"].size == 4500
    assert client.fetch(head, "blob") == data


def test_only_objects_the_newest_head_lists_are_kept(channel):
    pub, client = channel
    first = pub.publish(0, {"full-0": b"a" * 10})
    pub.publish(1, {"patch-1": b"b"}, keep=["full-0"])
    head = pub.publish(2, {"patch-2": b"c"}, keep=["patch-1"])
    assert sorted(head.objects) == ["patch-1", "patch-2"]
    assert client.fetch(head, "patch-1") == b"b"
    with pytest.raises(Gone):
        client.fetch(first, "full-0")  # dropped: the publisher no longer holds it
    with pytest.raises(ValueError, match="cannot keep"):
        pub.publish(3, {}, keep=["full-0"])


def test_a_late_reader_gets_only_the_newest_head(channel):
    pub, client = channel
    for v in range(5):
        pub.publish(v, {f"o{v}": b"x"})
    head = client.head(0, timeout=1)
    assert head.version == 4 and list(head.objects) == ["o4"]
    assert client.head(4, timeout=0.1) is None


def test_versions_must_increase(channel):
    pub, _ = channel
    pub.publish(2, {})
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(2, {})


@pytest.mark.parametrize("garbage", [b"not json", b'{"op": "chunk", "key": 5}', b'{"op": "head", "than": 0, "timeout": "x"}',
                                     b"\xff\xfe{", b"[" * 20_000 + b"]" * 20_000])  # not UTF-8; nested too deep
def test_a_malformed_request_gets_an_error_and_the_publisher_keeps_serving(channel, garbage):
    pub, client = channel
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(pub.address)
    raw.send(garbage)
    assert raw.poll(5000)
    assert b"ProtocolError" in raw.recv()
    raw.close(0)
    pub.publish(0, {"ok": b"ok"})
    assert client.head(-1, timeout=1).version == 0


def test_an_oversized_request_is_dropped_unread_and_the_publisher_keeps_serving(channel):
    from rlflow.transfer.channel import MAX_REQUEST_BYTES

    pub, client = channel
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(pub.address)
    raw.send(b'{"op": "head", "than": 0, "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}')
    assert not raw.poll(500)  # no answer: the connection was closed before the message was read
    raw.close(0)
    pub.publish(0, {"ok": b"ok"})
    assert client.head(-1, timeout=1).version == 0


def test_a_wait_without_a_publisher_fails_naming_the_address(short_dir):
    client = Client(f"ipc://{short_dir}/nobody", reply_grace=0.3)
    with pytest.raises(TimeoutError, match="nobody"):
        client.head(-1, timeout=0.1)
    client.close()


def test_a_keyed_channel_serves_only_its_key_holders_and_signs_every_head(short_dir):
    from rlflow.transfer.channel import ChannelKey
    from rlflow.transfer.wire import Unauthorized

    secret = os.urandom(32)
    key = ChannelKey(secret)
    pub = Publisher(f"ipc://{short_dir}/keyed", chunk_bytes=1000, key=key)
    holder, stranger, forger = (Client(pub.address), Client(pub.address, key=ChannelKey(os.urandom(32))),
                                Client(pub.address, key=key))
    try:
        pub.publish(0, {"blob": b"w" * 2500}, meta={"checksum": "abc"})
        for outsider in (holder, stranger):  # no token, then a token of another key
            with pytest.raises(Unauthorized, match="valid token"):
                outsider.head(-1)
        assert pub.server.refused == 2
        head = forger.head(-1)
        assert head.sig is not None and key.verify(head.to_json())
        assert forger.fetch(head, "blob") == b"w" * 2500
        tampered = {**head.to_json(), "meta": {"checksum": "attacker"}}
        assert not key.verify(tampered) and not key.verify({**head.to_json(), "sig": None})
        assert secret.hex() not in repr(key) and str(secret) not in repr(key) and key.token not in repr(key)
        with pytest.raises(ValueError, match="at least 16"):
            ChannelKey(b"short")
    finally:
        for c in (holder, stranger, forger):
            c.close()
        pub.close()


def test_a_reader_with_the_key_refuses_a_head_the_key_did_not_sign(short_dir):
    from rlflow.transfer.channel import ChannelKey
    from rlflow.transfer.wire import Unauthorized

    key = ChannelKey(os.urandom(32))
    impostor = Publisher(f"ipc://{short_dir}/impostor", chunk_bytes=1000)  # answers anyone, signs nothing
    client = Client(impostor.address, key=key)
    try:
        impostor.publish(7, {"patch-7": b"attacker weights"})
        with pytest.raises(Unauthorized, match="not signed"):
            client.head(-1)
    finally:
        client.close()
        impostor.close()


def test_a_peer_that_never_reads_its_replies_cannot_stall_the_channel(short_dir):
    """A reply that cannot be queued for its peer is dropped, never waited for: the serving thread once
    blocked on a full queue, and every reader of the weights with it."""
    pub = Publisher(f"ipc://{short_dir}/deaf", chunk_bytes=1000)
    client = Client(pub.address, reply_grace=5.0)
    deaf = zmq.Context.instance().socket(zmq.DEALER)
    deaf.setsockopt(zmq.LINGER, 0)
    deaf.setsockopt(zmq.RCVHWM, 1)
    deaf.setsockopt(zmq.RCVBUF, 4096)
    deaf.connect(pub.address)
    try:
        pub.publish(0, {f"object-{i}": b"x" for i in range(200)})  # a head of about 20 KB
        for _ in range(3000):
            deaf.send(b'{"op": "head", "than": -1, "timeout": 0}')
        time.sleep(0.5)  # let the flood reach the channel's thread
        assert client.head(-1, timeout=0).version == 0  # answered within the reply grace: nothing waits on the deaf peer
        assert pub.server.dropped > 0
    finally:
        deaf.close(0)
        client.close()
        pub.close()
