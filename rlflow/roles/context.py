"""What a role loop is given (``RoleContext``) and the helpers every role loop shares.

The launcher (``flow/``) builds a ``RoleContext`` for each replica; a role loop (``roles/rollout.py``,
``reward.py``, ``reference.py``, ``actor.py``) receives it with its own config and knows nothing more of
launching. The plug-in interfaces are elsewhere: engines in ``engines/base.py``, a reward is a plain
function (``tasks/rewards.py``), user code is named by dotted path (``rlflow/plugins.py``)."""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from rlflow.roles import reports, schema

class Endpoints(Protocol):
    """Where a role listens and how it finds others' sockets (the launcher's concern: ``flow/placement/endpoints.py``)."""

    def bind_address(self, name: str) -> str:
        """The address to bind endpoint ``name`` at (it may carry port 0: the OS picks)."""

    def advertise(self, name: str, address: str) -> None:
        """Publish the address ``name`` was actually bound at."""

    def lookup(self, name: str, timeout: float) -> str:
        """The address of endpoint ``name``, waiting up to ``timeout`` for it to be advertised."""


class Timeline:
    """What a replica spends its time on, as spans for the run's trace (``rlflow report``: trace.json).

    A role loop records a span per activity: ``generate``, ``score``, ``train``, ``sync`` (weights),
    ``checkpoint``, ``wait`` (for rows, groups or weights). Spans are taken out by whoever hosts the
    role (``flow/placement/worker.py`` sends them with each heartbeat) and cost the loop an append. The buffer is
    bounded: if nobody takes spans out (the launcher stopped reading), the oldest are dropped and
    counted, so a stuck reader never grows a role's memory.
    """

    MAX_SPANS = 20_000  # about 5 MB; at a few spans per step, minutes of a run

    def __init__(self) -> None:
        self._spans: deque[dict] = deque(maxlen=self.MAX_SPANS)
        self._open: list[tuple[str, float, dict]] = []  # spans entered and not yet left (innermost last)
        self.dropped = 0

    @contextmanager
    def span(self, name: str, **args) -> Iterator[dict]:
        """Record the ``with`` block as span ``name``; the yielded ``args`` may be filled in inside it."""
        entry = (name, time.time(), args)
        self._open.append(entry)
        try:
            yield args
        finally:
            self._open.remove(entry)
            self.add(name, entry[1], time.time() - entry[1], **args)

    def add(self, name: str, start: float, seconds: float, **args) -> None:
        """A span that started at ``start`` (time.time()) and lasted ``seconds``."""
        if len(self._spans) == self.MAX_SPANS:
            self.dropped += 1
        self._spans.append({"name": name, "t": round(start, 6), "d": round(seconds, 6), "args": args})

    def take(self, last: bool = False) -> list[dict]:
        """Every span recorded so far, oldest first, and forget them (safe against a concurrent ``add``).

        ``last``: the process is stopping; spans still open (an idle wait, typically) end now, marked unfinished.
        """
        out = []
        while self._spans:
            out.append(self._spans.popleft())
        if last:
            now = time.time()
            out += [{"name": name, "t": round(t0, 6), "d": round(now - t0, 6), "args": {**args, "unfinished": True}}
                    for name, t0, args in list(self._open)]
        return out


def shard_endpoint(name: str, shard: int) -> str:
    """The endpoint of trainer rank ``shard``'s copy of weight endpoint ``name`` (a sharded trainer publishes
    a channel per rank, and every relay serves each): ``weights``, ``weights.1``; ``weights-2``, ``weights-2.1``."""
    return name if shard == 0 else f"{name}.{shard}"


@dataclass
class RoleContext:
    """Everything a role loop gets from whoever launched it; roles know nothing more of launching."""

    bus: Any  # transfer.BusClient
    endpoints: Endpoints  # names -> addresses: "weights" (the actor's channel), "weights-<i>" (relays)
    keys_dir: str | None  # CURVE keys for sockets beyond loopback (transfer/security.py); None on one host
    model_path: str  # checkpoint every role starts from (version 0)
    report: Callable[..., None]  # report(kind, **data): metrics, warnings, errors to the launcher
    run_dir: str
    replica: int  # this replica's index among the role's replicas
    seed: int
    wait_seconds: float  # bound on any wait for data or weights that should arrive
    lease_seconds: float  # lease on rows taken from the bus
    timeline: Timeline = field(default_factory=Timeline)  # spans of this replica's activities, for the trace
    channel_key: Any = None  # transfer.channel.ChannelKey of the weight channel: the actor and rollouts only
    bounds: dict = field(default_factory=dict)  # column -> (lo, hi) every delivered value lies in (schema.limits)
    env_workers: Any = None  # where a rollout's environment workers run (envs/pool.Spawner); None: processes beside it


IDLE_WAIT_S = 30.0  # one idle get's bound; a role loop then re-checks its own state and waits again


def next_rows(ctx: RoleContext, consumer: str, columns: list[str], n: int, groups: bool = False,
              timeout: float = IDLE_WAIT_S):
    """The next delivery of up to ``n`` ready rows (or groups) for a role that may idle for a long time.

    Idling is normal for rollout, reward and reference (with staleness 0 they wait while the actor
    trains), so an idle bound passing is not an error; the run's progress is bounded by the actor's wait.
    Returns None after an idle bound so the caller can do between-deliveries work (load weights).
    ``timeout=0``: only what is ready now, recording no wait (a loop with other work polls this way).
    """
    from rlflow.transfer import BusTimeout

    with ctx.timeline.span("wait", rows=0) if timeout else nullcontext({}) as span:
        try:
            d = ctx.bus.get(consumer, columns, n=n, min_n=1, groups=groups, timeout=timeout,
                            lease=ctx.lease_seconds)
        except BusTimeout:
            return None
        span["rows"] = len(d)
    schema.refuse_out_of_range(d, ctx.bounds)
    return d


def ack_work(ctx: RoleContext, delivery) -> None:
    """Ack a delivery whose results were put (rollout, reward, reference: at-least-once work).

    A lease that ran out meanwhile is not an error: its rows went back to the bus and another replica
    redoes them; the bus keeps whichever result came first. The launcher counts it.
    """
    from rlflow.transfer import LeaseExpired

    try:
        ctx.bus.ack(delivery)
    except LeaseExpired:
        ctx.report(reports.LEASE_EXPIRED, rows=len(delivery))


def renew_leases(ctx: RoleContext, deliveries) -> None:
    """Keep the leases of ``deliveries`` (those still being worked on): each is renewed once a third of
    its lease is gone, so long work (an episode, a long generation) never loses its rows to another
    replica while it runs."""
    from rlflow.transfer import LeaseExpired

    now = time.monotonic()
    for d in list(deliveries):
        if now - d.leased_at > ctx.lease_seconds / 3:
            try:
                ctx.bus.renew(d, lease=ctx.lease_seconds)
            except LeaseExpired:  # gone already: another replica redoes its rows; ours are dropped on put
                ctx.report(reports.LEASE_EXPIRED, rows=len(d))
                d.leased_at = math.inf  # not renewed again
