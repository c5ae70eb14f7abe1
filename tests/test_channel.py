"""The versioned channel: newest version only, parked waits answered on publish, bounded waits."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from transfer.channel import Publisher, Subscriber


@pytest.fixture
def channel(short_dir):
    pub = Publisher(f"ipc://{short_dir}/ch")
    sub = Subscriber(pub.address)
    yield pub, sub
    sub.close()
    pub.close()


def test_a_wait_with_nothing_newer_returns_none_at_its_deadline(channel):
    pub, sub = channel
    t0 = time.monotonic()
    assert sub.newer(-1, timeout=0.3) is None
    assert 0.25 < time.monotonic() - t0 < 5


def test_a_parked_wait_is_answered_when_a_version_is_published(channel):
    pub, sub = channel
    threading.Timer(0.2, pub.publish, args=(0, [b"w0"], {"checksum": "x"})).start()
    item = sub.wait_newer(-1, timeout=10)
    assert (item.version, item.meta, item.frames[0].bytes) == (0, {"checksum": "x"}, b"w0")


def test_a_late_subscriber_gets_only_the_newest_version(channel):
    pub, sub = channel
    for v in range(5):
        pub.publish(v, [f"w{v}".encode()])
    item = sub.newer(0, timeout=1)
    assert item.version == 4 and item.frames[0].bytes == b"w4"
    assert sub.newer(4, timeout=0.1) is None


def test_version_only_requests_carry_no_payload(channel):
    pub, sub = channel
    pub.publish(3, [b"x" * 100_000])
    item = sub.newer(-1, timeout=1, payload=False)
    assert item.version == 3 and item.frames == []


def test_versions_must_increase(channel):
    pub, _ = channel
    pub.publish(2, [b""])
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(2, [b""])


def test_a_malformed_request_gets_an_error_and_the_publisher_keeps_serving(channel):
    pub, sub = channel
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(pub.address)
    raw.send(b"not json")
    assert raw.poll(5000)
    assert b"ProtocolError" in raw.recv()
    raw.close(0)
    pub.publish(0, [b"ok"])
    assert sub.newer(-1, timeout=1).version == 0


def test_a_wait_without_a_publisher_fails_naming_the_address(short_dir):
    sub = Subscriber(f"ipc://{short_dir}/nobody", reply_grace=0.3)
    with pytest.raises(TimeoutError, match="nobody"):
        sub.newer(-1, timeout=0.1)
    sub.close()
