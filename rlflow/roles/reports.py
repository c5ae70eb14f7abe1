"""The reports a role replica sends the launcher over the control socket, declared once (as ``schema.py``
declares the bus's columns).

A report is one JSON object: ``{"role", "replica", "incarnation", "pid", "kind", **fields}``. The worker
(``flow/placement/worker.py``) adds the first four; a role loop calls ``ctx.report(KIND, **fields)``.
The launcher reads each with ``problem``: a report of an unknown kind, from a role that may not send
it, or without the fields its kind carries is refused and named, never half-handled.
"""

from __future__ import annotations

READY = "ready"  # the replica's engine is up and its loop starts
HEARTBEAT = "heartbeat"  # alive; carries the timeline spans recorded since the last beat
WORK = "work"  # a batch of rollout, reward or reference work done: its samples and the seconds it took
SYNC = "sync"  # a rollout replica applied (or refused) a weight version
METRICS = "metrics"  # the actor finished a step: the step's metrics and the exactly-once ledger's uids
DONE = "done"  # the actor finished every step
FAILED = "failed"  # the replica's loop raised: its traceback
REWARD_ERROR = "reward_error"  # the first failure of a kind of the reward function, in full
LEASE_EXPIRED = "lease_expired"  # a delivery's lease ran out before its ack (the rows were redone)

ROLES = ("rollout", "reward", "reference", "actor")
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # kind -> (roles that send it, required fields)
    READY: (ROLES, ()),
    HEARTBEAT: (ROLES, ("spans", "spans_dropped")),
    WORK: (("rollout", "reward", "reference"), ("samples", "seconds")),
    SYNC: (("rollout",), ("bit_exact", "from_actor_bytes", "from_peers_bytes")),
    METRICS: (("actor",), ("step", "samples", "reward/errors", "uids", "skipped_uids")),
    DONE: (("actor",), ("version", "replicas", "identical_weights")),
    FAILED: (ROLES, ("traceback",)),
    REWARD_ERROR: (("reward",), ("uid", "prompt", "response", "failure", "error", "traceback")),
    LEASE_EXPIRED: (ROLES, ("rows",)),
}


def problem(report: object) -> str | None:
    """Why ``report`` is not a report the launcher can act on, or None when it is."""
    if not isinstance(report, dict):
        return f"not a JSON object but {type(report).__name__}"
    kind, role = report.get("kind"), report.get("role")
    if kind not in FIELDS:
        return f"unknown kind {kind!r} (the kinds are {', '.join(FIELDS)})"
    senders, fields = FIELDS[kind]
    if role not in senders:
        return f"a {kind!r} report from role {role!r}, which does not send it"
    if not isinstance(report.get("replica"), int):
        return f"a {kind!r} report without an integer replica"
    missing = [f for f in fields if f not in report]
    return f"a {kind!r} report from {role}-{report['replica']} without {', '.join(missing)}" if missing else None
