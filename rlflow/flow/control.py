"""The control socket: role replicas' reports (``roles/reports.py``) into the launcher's event queue.

One PULL socket on a thread of its own; every report is checked where it is read (``reports.problem``):
one that is not a report the launcher can act on becomes a ``bad_report`` event naming what is wrong,
so a confused or hostile sender can neither crash the launcher nor be half-handled. A report is
believed only when it carries its role's credential (the run's per-role token, ``roles/schema.grants``),
so no other process can speak for a role: a forged ``metrics`` would corrupt the exactly-once ledger.
The token is dropped as the report is read. With CURVE keys (a cluster) only the run's registered client
keys can connect at all, and the address roles are given names this socket's own server key. The thread
stops when ``stopped`` is set, after taking in what the stopped roles sent last.
"""

from __future__ import annotations

import hmac
import queue
import threading
import time

import zmq

from rlflow.roles import reports
from rlflow.transfer import security
from rlflow.transfer.wire import decode_header

BIND_S = 30.0  # bound on the thread binding the socket
POLL_MS = 200  # how soon the thread notices ``stopped``; not a bound on anything a role waits for
QUIET_MS = 100  # once every role stopped: their last reports are in once the socket was quiet this long
DRAIN_S = 2.0  # bound on taking in those last reports (a sender that never stops cannot hold shutdown)
MAX_REPORT_BYTES = 64 << 20  # a report bigger than this (the actor's carries a step's uids) is refused unread


class ControlReceiver:
    def __init__(self, address: str, keys_dir: str | None, events: queue.Queue, stopped: threading.Event,
                 tokens: dict[str, str] | None = None):
        """``tokens``: role -> its credential (the run's bus tokens); a report is believed only with its
        role's (None: any well-formed report is, for a receiver of one's own)."""
        self.events, self.stopped, self.tokens = events, stopped, tokens
        bound: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._receive, args=(address, keys_dir, bound), name="rlflow-control",
                                       daemon=True)
        self.thread.start()
        try:
            result = bound.get(timeout=BIND_S)
        except queue.Empty:
            raise TimeoutError(f"the control socket was not bound at {address} within {BIND_S:.0f}s") from None
        if isinstance(result, BaseException):
            raise result
        self.address = result  # where it listens (port 0 resolved)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _receive(self, address: str, keys_dir: str | None, bound: queue.Queue) -> None:
        try:
            sock = zmq.Context.instance().socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPORT_BYTES)
            served_key = None
            if keys_dir is not None:
                _, served_key = security.serve_curve(zmq.Context.instance(), sock, keys_dir)
            sock.bind(address)
            where = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            bound.put(security.pinned(where, served_key) if served_key is not None else where)
        except BaseException as e:
            bound.put(e)
            return
        try:
            while not self.stopped.is_set():  # roles report until they are stopped (their last spans)
                if sock.poll(POLL_MS):
                    self._take(sock.recv())
            # What the stopped roles sent last may still be on its way through the socket's I/O thread:
            # take reports until it is quiet (a poll of 0 could end before the last of them arrived).
            deadline = time.monotonic() + DRAIN_S
            while time.monotonic() < deadline and sock.poll(QUIET_MS):
                self._take(sock.recv())
        finally:
            sock.close(0)

    def _take(self, frame: bytes) -> None:
        """One frame into the event queue: a report ``problem`` finds nothing wrong with, else a
        ``bad_report`` naming what is wrong. Nothing a sender puts in a frame can stop this thread."""
        try:
            report = decode_header(frame)  # not UTF-8, not JSON, nested too deep: ProtocolError
            why = reports.problem(report)
            if why is None:
                token = str(report.pop("token", ""))  # never kept, logged or shown
                if self.tokens is not None and not hmac.compare_digest(token, self.tokens.get(report["role"], "")):
                    why = f"a {report['kind']!r} report in the name of {report['role']}-{report['replica']} " \
                          f"without that role's credential"
        except Exception as e:  # noqa: BLE001 - a frame is data: whatever is wrong with it is reported, not raised
            why = str(e)[:300]
        if why is not None:
            self.events.put(("bad_report", {"why": why, "head": bytes(frame[:60])}))  # (a token comes last)
            return
        self.events.put(("report", report))
