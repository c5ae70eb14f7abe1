"""Hostile peers for the bus and the weight channel: malformed, oversized, replayed and out-of-order
messages from several connections, for tests that check a real run does not notice them.

What a peer that can connect is trusted with is left out on purpose: clearing rows, releasing
leases, naming the run's own consumers, declaring which consumers free rows, reserving real capacity.
Those are the protocol's semantics, not malformed input; beyond this machine CURVE decides who can
connect at all, and on one machine the socket directory is private to the user.
"""

from __future__ import annotations

import json
import random
import time

import pyarrow as pa
import zmq

from rlflow.transfer.wire import encode_batch, encode_header, encode_schema

JUNK_CONSUMERS = [f"intruder-{i}" for i in range(8)]


def _valid_put(rng: random.Random) -> bytes:
    batch = pa.record_batch({"uid": [f"x{rng.random()}"], "group_id": ["xg"],
                             "prompt_ids": pa.array([[1, 2, 3]], pa.list_(pa.int32()))})
    return encode_batch(batch).to_pybytes()


def bus_message(rng: random.Random) -> list[bytes]:
    """One hostile message for the bus (a list of frames)."""
    kind = rng.randrange(12)
    rid = rng.randrange(1 << 30)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(1, 2000))]
    if kind == 1:  # random frames
        return [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(2, 6))]
    if kind == 2:  # JSON that is not an object, or an object that is not a request
        return [json.dumps(rng.choice([[], 5, "put", None, {"op": None}, {"op": 7}, {"op": "get"}])).encode()]
    if kind == 3:  # truncated Arrow payload in a put
        frame = _valid_put(rng)
        return [encode_header({"op": "put", "id": rid, "reservation": "r" + str(rid)}), frame[: rng.randrange(len(frame))]]
    if kind == 4:  # wrong schemas: a declared column with another type, an undeclared one, integer uids
        batch = rng.choice([
            pa.record_batch({"uid": ["a"], "group_id": ["g"], "prompt_ids": ["not a list"]}),
            pa.record_batch({"uid": ["a"], "nonsense": [1.5]}),
            pa.record_batch({"uid": [1, 2], "reward": pa.array([0.0, 1.0], pa.float32())})])
        return [encode_header({"op": "put", "id": rid, "reservation": "r"}), encode_batch(batch).to_pybytes()]
    if kind == 5:  # huge sizes and bounds
        return [encode_header(rng.choice([
            {"op": "reserve", "id": rid, "rows": 10**12, "bytes": 10**18, "timeout": 1},
            {"op": "reserve", "id": rid, "rows": 1, "bytes": 1 << 62, "timeout": 1},
            {"op": "get", "id": rid, "consumer": rng.choice(JUNK_CONSUMERS), "columns": ["prompt_ids"], "n": 10**9,
             "min_n": 10**9, "timeout": 1e300, "lease": 1},
            {"op": "get", "id": rid, "consumer": "x", "columns": ["prompt_ids"], "n": 1, "timeout": float("nan"),
             "lease": -1},
            {"op": "stats", "id": rid, **{f"k{i}": "v" * 100 for i in range(1000)}}]))]
    if kind == 6:  # replayed and out-of-order: acks, nacks, renewals of leases never granted
        op = rng.choice(["ack", "nack", "renew"])
        header = {"op": op, "id": rid, "consumer": rng.choice(JUNK_CONSUMERS + ["actor", "rollout"]),
                  "lease": rng.randbytes(8).hex(), "lease_seconds": 1}
        if op == "ack" and rng.random() < 0.5:
            header["uids"] = rng.choice([["g0-0"], [1, 2], [[1]], [None]])
        return [encode_header(header)]
    if kind == 7:  # a put of a reservation never granted, and one with no reservation at all
        header = {"op": "put", "id": rid}
        if rng.random() < 0.5:
            header["reservation"] = rng.randbytes(8).hex()
        return [encode_header(header), _valid_put(rng)]
    if kind == 8:  # shared-memory puts naming files that are not ours
        name = rng.choice(["../../etc/passwd", "/dev/shm/x", f"rlflow-1-{rng.randbytes(8).hex()}", "", "rlflow-"])
        return [encode_header({"op": "put", "id": rid, "shm": name, "rows": 1, "bytes": 10, "timeout": 1})]
    if kind == 9:  # a junk consumer asking for rows (its own state: the run's consumers are untouched)
        return [encode_header({"op": "get", "id": rid, "consumer": rng.choice(JUNK_CONSUMERS),
                               "columns": rng.choice([["prompt_ids"], ["reward"], ["nope"], [3]]),
                               "n": rng.randrange(1, 4), "min_n": 1, "timeout": rng.choice([0, 0.2]),
                               "lease": 0.5, "groups": rng.random() < 0.5,
                               "where": rng.choice([None, [["target_step", ">=", 0]], [["x", "?", "y"]], "bad"])})]
    if kind == 10:  # declares: a broken schema frame, or a junk column
        frame = rng.choice([rng.randbytes(50), encode_schema({f"junk{rng.randrange(4)}": pa.int8()}).to_pybytes()])
        return [encode_header({"op": "declare", "id": rid, "release_after": rng.choice([[], "x", [1]])}), frame]
    return [encode_header({"op": "hello", "id": rid})]  # a harmless request, replayed


def channel_message(rng: random.Random) -> list[bytes]:
    """One hostile message for a weight channel node."""
    kind = rng.randrange(8)
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 2000))]
    if kind == 1:
        return [rng.randbytes(20) for _ in range(rng.randrange(2, 5))]
    if kind == 2:
        return [json.dumps(rng.choice([[], 1, "head", None, {"op": "head"}, {"op": "chunk", "key": 1}])).encode()]
    if kind == 3:  # bad numbers: NaN, infinite, negative and huge timeouts; negative, huge and float indices
        return [json.dumps(rng.choice([
            {"op": "head", "than": 0, "timeout": float("nan")}, {"op": "head", "than": 0, "timeout": float("inf")},
            {"op": "head", "than": 0, "timeout": -5}, {"op": "head", "than": "x", "timeout": 1},
            {"op": "chunk", "key": "full-0", "i": -1, "timeout": 0}, {"op": "chunk", "key": "full-0", "i": 10**12,
                                                                      "timeout": 0},
            {"op": "chunk", "key": "full-0", "i": 1.5, "timeout": 0}])).encode()]
    if kind == 4:  # objects that do not exist
        return [json.dumps({"op": "chunk", "key": rng.choice(["full-999999", "patch-x", "", "../x"]),
                            "i": rng.randrange(3), "timeout": 0}).encode()]
    if kind == 5:  # a flood of waiting requests (a head that will never come)
        return [json.dumps({"op": "head", "than": 10**12, "timeout": 3600}).encode()]
    if kind == 6:  # replayed legitimate reads
        return [json.dumps({"op": "head", "than": -1, "timeout": 0}).encode()]
    return [json.dumps({"op": "chunk", "key": "full-0", "i": 0, "timeout": 0}).encode()]


def control_message(rng: random.Random) -> list[bytes]:
    """One hostile frame for the launcher's control socket: malformed, mistyped, or well-formed reports in
    the name of the live actor (a ``done`` long before the last step, a step's ``metrics``) without its
    credential."""
    beat = {"role": "rollout", "replica": 0, "incarnation": 0, "pid": 1, "kind": "heartbeat", "spans": [],
            "spans_dropped": 0}
    kind = rng.randrange(9)
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 500))]
    if kind == 1:
        return [b"[" * 100_000 + b"]" * 100_000]
    if kind == 2:
        return [json.dumps(rng.choice([[], 7, None, "done", {"kind": "done"}])).encode()]
    if kind == 3:
        return [json.dumps({**beat, "incarnation": rng.choice([None, "0", 1.5])}).encode()]
    if kind == 4:
        return [json.dumps({**beat, "kind": rng.choice(["shutdown", "metrics", "done", "ready!"])}).encode()]
    if kind == 5:
        return [json.dumps({**beat, "role": "actor", "kind": "failed", "traceback": 42}).encode()]
    if kind == 6:
        return [json.dumps({**beat, "replica": 99}).encode()]  # a replica the run does not have: ignored
    if kind == 7:  # a well-formed step report that would corrupt the exactly-once ledger if believed
        return [json.dumps({**beat, "role": "actor", "kind": "metrics", "step": rng.randrange(1, 200), "samples": 1,
                            "reward/errors": 0, "uids": [f"g{rng.randrange(99)}-0"], "skipped_uids": []}).encode()]
    return [json.dumps({**beat, "role": "actor", "kind": "done", "version": rng.choice([5, 200]), "replicas": 1,
                        "identical_weights": True}).encode()]


class Peers:
    """``n`` connections of ``kind`` (DEALER, or PUSH for the control socket) to one address; sends round
    robin and drains every reply."""

    def __init__(self, address: str, n: int, kind: int = zmq.DEALER):
        self.socks = []
        for _ in range(n):
            s = zmq.Context.instance().socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            self.socks.append(s)
        self.sent = self.replies = 0

    def send(self, frames: list[bytes]) -> None:
        sock = self.socks[self.sent % len(self.socks)]
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            pass
        self.drain()

    def drain(self) -> None:
        for s in self.socks:
            while s.poll(0):
                s.recv_multipart()
                self.replies += 1

    def close(self, settle: float = 1.0) -> None:
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            self.drain()
            time.sleep(0.05)
        for s in self.socks:
            s.close(0)


def pushing_heads(address: str, head: dict, chunk: bytes, stop) -> None:
    """A weight-channel peer that answers every request with ``head`` and every chunk request with
    ``chunk`` too (runs until ``stop`` is set): an upstream that tries to make its relay adopt its head."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    try:
        while not stop.is_set():
            if sock.poll(50):
                identity, frame = sock.recv_multipart()
                req = json.loads(frame)
                sock.send_multipart([identity, json.dumps({"ok": True, "op": "head", "head": head}).encode()])
                if req.get("op") == "chunk":
                    sock.send_multipart([identity, json.dumps({"ok": True, "op": "chunk", "key": req["key"],
                                                               "i": req["i"]}).encode(), chunk])
    finally:
        sock.close(0)
