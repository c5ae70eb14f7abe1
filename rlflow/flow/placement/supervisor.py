"""Supervision: which role replicas are alive, which are hung, and whether a failed one may restart.

The launcher (``flow/launcher.py``) feeds this the events of the run and acts on its answers; this
module owns the policy and its bookkeeping, not the processes.

Policy (per role):
- rollout, reward, reference: restarted in place. The launcher kills what is left of the replica,
  hands its leases back to the bus (``BusClient.release``: the rows it held are redelivered at once),
  and starts a fresh incarnation; a rollout replica fetches a full weight snapshot as it starts.
  Nothing is lost: every row it held is redelivered, and a result it had put already stays (first
  write wins, ``transfer/store.py``).
- actor (the trainer): restarted from its last checkpoint (``flow/launcher.py``: ``_rewind``).
- A replica that fails before its first ``ready`` in its first incarnation is not restarted: that is
  a configuration or installation error, and a restart would fail the same way.
- A replica may restart ``max_restarts`` times within ``restart_window_s``; the next failure stops the
  run with a report of every failure.

Liveness: every replica sends a heartbeat each ``heartbeat_s`` (``flow/placement/worker.py``); any report counts
as one. A replica silent for ``hang_s`` is hung (frozen, deadlocked) and handled as dead. Before its
first heartbeat a replica gets ``START_GRACE_S`` more (imports, model loading on a busy machine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rlflow.errors import require

START_GRACE_S = 120.0
RESTARTABLE = ("rollout", "reward", "reference", "actor")


@dataclass
class SupervisionConfig:
    """What happens when a role replica dies, hangs or fails."""

    restart: bool = True
    """Restart failed replicas (rollout, reward, reference in place; the actor from its last checkpoint);
    false: any failure stops the run."""
    max_restarts: int = 3
    """Restarts one replica may take within `restart_window_s`; one more failure stops the run."""
    restart_window_s: float = 3600.0
    """The window `max_restarts` counts in."""
    heartbeat_s: float = 1.0
    """Seconds between a replica's heartbeats."""
    hang_s: float = 60.0
    """A replica without a heartbeat for this long is hung (frozen, deadlocked): it is killed and restarted."""

    def check(self, at: str = "supervision") -> None:
        require(self.max_restarts >= 0, f"{at}.max_restarts", f"must be >= 0, got {self.max_restarts}")
        require(self.restart_window_s > 0, f"{at}.restart_window_s", f"must be > 0 seconds, got {self.restart_window_s}")
        require(0 < self.heartbeat_s < self.hang_s, f"{at}.heartbeat_s/hang_s",
                f"need 0 < heartbeat_s < hang_s (a few heartbeats may be late before a replica counts as hung), "
                f"got {self.heartbeat_s}, {self.hang_s}")


@dataclass
class Replica:
    incarnation: int = 0
    started: float = field(default_factory=time.monotonic)
    last_beat: float | None = None  # None until its first heartbeat or report
    ready: bool = False
    restarts: list[float] = field(default_factory=list)  # monotonic times of its restarts


class Supervisor:
    def __init__(self, cfg: SupervisionConfig):
        self.cfg = cfg
        self.replicas: dict[str, Replica] = {}
        self.history: list[dict] = []  # every failure handled: what, when, and what was done
        self.t0 = time.monotonic()

    def started(self, name: str) -> int:
        """A new incarnation of ``name`` was started; returns its incarnation number."""
        r = self.replicas.get(name)
        if r is None:
            self.replicas[name] = r = Replica()
        else:
            r.incarnation, r.started, r.last_beat, r.ready = r.incarnation + 1, time.monotonic(), None, False
        return r.incarnation

    def incarnation(self, name: str) -> int:
        return self.replicas[name].incarnation

    def current(self, name: str, incarnation: int | None) -> bool:
        """Is an event from ``incarnation`` of ``name`` about the live incarnation (not a dead one's)?"""
        r = self.replicas.get(name)
        return r is not None and (incarnation is None or incarnation == r.incarnation)

    def heard(self, name: str, kind: str) -> None:
        r = self.replicas[name]
        r.last_beat = time.monotonic()
        if kind == "ready" and not r.ready:
            r.ready = True
            for entry in self.history:  # a restart is complete once the new incarnation is ready
                if entry["replica"] == name and entry["action"] == "restarted" and "ready_s" not in entry:
                    entry["ready_s"] = round(r.last_beat - r.started, 3)

    def hung(self) -> list[tuple[str, float]]:
        """(name, seconds silent) of every replica past its liveness bound."""
        now, out = time.monotonic(), []
        for name, r in self.replicas.items():
            if r.last_beat is None:
                if now - r.started > self.cfg.hang_s + START_GRACE_S:
                    out.append((name, now - r.started))
            elif now - r.last_beat > self.cfg.hang_s:
                out.append((name, now - r.last_beat))
        return out

    def may_restart(self, name: str, role: str, failed: bool) -> str | None:
        """None if ``name`` may restart now (and counts the restart), else why not."""
        r, now = self.replicas[name], time.monotonic()
        if not self.cfg.restart:
            return "supervision.restart=false"
        if role not in RESTARTABLE:
            return f"{role} is not restartable"
        if failed and not r.ready and r.incarnation == 0:
            return "it failed while starting: a restart would fail the same way"
        recent = [t for t in r.restarts if now - t < self.cfg.restart_window_s]
        if len(recent) >= self.cfg.max_restarts:
            return (f"it already restarted {len(recent)} time(s) within supervision.restart_window_s="
                    f"{self.cfg.restart_window_s:.0f}s (supervision.max_restarts={self.cfg.max_restarts})")
        r.restarts = recent + [now]
        return None

    def record(self, name: str, incarnation: int, what: str, action: str, **extra) -> dict:
        """Note a failure of ``incarnation`` of ``name`` and what was done about it."""
        entry = {"replica": name, "incarnation": incarnation, "what": what, "action": action,
                 "at_s": round(time.monotonic() - self.t0, 3), **extra}
        self.history.append(entry)
        return entry
