"""The launcher's control socket (flow/control.py): whatever a sender puts in a frame, the receiving
thread refuses it by name and keeps taking the reports that are right."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import zmq

from rlflow.flow.control import ControlReceiver

GOOD = {"role": "rollout", "replica": 0, "incarnation": 0, "pid": 1, "kind": "heartbeat", "spans": [],
        "spans_dropped": 0}
HOSTILE = [
    (b"[]", "must be a JSON object, got list"),
    (b"\xff\xfe\x00not utf-8", "header frame is not a JSON object"),
    (b"[" * 200_000 + b"]" * 200_000, "RecursionError"),
    (json.dumps({**GOOD, "kind": "shutdown"}).encode(), "unknown kind 'shutdown'"),
    (json.dumps({**GOOD, "kind": "done"}).encode(), "from role 'rollout', which does not send it"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "incarnation"}).encode(), "without 'incarnation'"),
    (json.dumps({**GOOD, "incarnation": "0"}).encode(), "'incarnation' is str, not int"),
    (json.dumps({**GOOD, "replica": True}).encode(), "'replica' is bool, not int"),
    (json.dumps({**GOOD, "role": "actor", "kind": "metrics", "step": 3, "samples": 1, "reward/errors": 0,
                 "uids": [1, 2], "skipped_uids": []}).encode(), "'uids' are not all strings"),
    (json.dumps({**GOOD, "role": "actor", "kind": "done", "version": 9, "replicas": 1,
                 "identical_weights": "yes"}).encode(), "'identical_weights' is str, not bool"),
]


@pytest.fixture
def receiver(short_dir):
    events, stopped = queue.Queue(), threading.Event()
    r = ControlReceiver(f"ipc://{short_dir}/control", None, events, stopped)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(r.address)
    yield r, events, push
    push.close(0)
    stopped.set()
    r.join(5)


def test_every_malformed_report_is_refused_by_name_and_the_next_good_one_still_arrives(receiver):
    r, events, push = receiver
    for frame, why in HOSTILE:
        push.send(frame)
        kind, ev = events.get(timeout=10)
        assert kind == "bad_report" and why in ev["why"], (why, ev)
    push.send(json.dumps(GOOD).encode())
    assert events.get(timeout=10) == ("report", GOOD)
    assert r.thread.is_alive()


def test_a_report_is_believed_only_with_its_roles_credential_which_is_never_passed_on(short_dir):
    events, stopped = queue.Queue(), threading.Event()
    tokens = {"rollout": "r" * 32, "actor": "a" * 32}
    r = ControlReceiver(f"ipc://{short_dir}/control", None, events, stopped, tokens=tokens)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(r.address)
    try:
        for token in (None, "wrong", "a" * 32):  # none, a guess, another role's
            push.send(json.dumps({**GOOD, **({"token": token} if token else {})}).encode())
            kind, ev = events.get(timeout=10)
            assert kind == "bad_report" and "without that role's credential" in ev["why"]
        push.send(json.dumps({**GOOD, "token": "r" * 32}).encode())
        assert events.get(timeout=10) == ("report", GOOD)  # believed, and its token not passed on
    finally:
        push.close(0)
        stopped.set()
        r.join(5)
