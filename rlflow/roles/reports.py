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
REPLACE = "replace"  # dynamic sampling: the actor dropped groups of the step it fills; issue that many more
ENV_ERROR = "env_error"  # an episode's environment failed (raised, timed out, died): that episode only

ROLES = ("rollout", "reward", "reference", "actor")
NUMBER = (int, float)
TEXT_OR_NONE = (str, type(None))
FIELDS: dict[str, tuple[tuple[str, ...], dict[str, type | tuple[type, ...]]]] = {
    # kind -> (roles that send it, each required field's type)
    READY: (ROLES, {}),
    HEARTBEAT: (ROLES, {"spans": list, "spans_dropped": int}),
    WORK: (("rollout", "reward", "reference"), {"samples": int, "seconds": NUMBER}),
    SYNC: (("rollout",), {"bit_exact": (bool, int), "from_actor_bytes": int, "from_peers_bytes": int}),
    METRICS: (("actor",), {"step": int, "samples": int, "reward/errors": int, "uids": list, "skipped_uids": list}),
    DONE: (("actor",), {"version": int, "replicas": int, "identical_weights": bool}),
    FAILED: (ROLES, {"traceback": str}),
    REWARD_ERROR: (("reward",), {"uid": str, "prompt": TEXT_OR_NONE, "response": str, "failure": str, "error": str,
                                 "traceback": str}),
    LEASE_EXPIRED: (ROLES, {"rows": int}),
    REPLACE: (("actor",), {"step": int, "groups": int}),
    ENV_ERROR: (("rollout",), {"uid": str, "failure": str, "error": str}),
}
ENVELOPE = {"replica": int, "incarnation": int, "pid": int}  # what the worker adds to every report


def problem(report: object) -> str | None:
    """Why ``report`` is not a report the launcher can act on, or None when it is: an object of a known
    kind, from a role that sends it, with the envelope and every field its kind carries, each of its
    type (a list of uids is checked to hold strings too: the ledger keys on them)."""
    if not isinstance(report, dict):
        return f"not a JSON object but {type(report).__name__}"
    kind, role = report.get("kind"), report.get("role")
    if kind not in FIELDS:
        return f"unknown kind {str(kind)[:40]!r} (the kinds are {', '.join(FIELDS)})"
    senders, fields = FIELDS[kind]
    if role not in senders:
        return f"a {kind!r} report from role {str(role)[:40]!r}, which does not send it"
    for name, kind_of in {**ENVELOPE, **fields}.items():
        value = report.get(name, ...)
        if value is ...:
            return f"a {kind!r} report from {role} without {name!r}"
        if not isinstance(value, kind_of) or (kind_of is int and isinstance(value, bool)):
            return f"a {kind!r} report from {role} whose {name!r} is {type(value).__name__}, not {_names(kind_of)}"
    for name in ("uids", "skipped_uids"):
        if name in fields and not all(isinstance(u, str) for u in report[name]):
            return f"a {kind!r} report from {role} whose {name!r} are not all strings"
    return None


def _names(kind_of: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (kind_of if isinstance(kind_of, tuple) else (kind_of,)))
