"""The launch contract: what the launcher hands each role replica, as typed records.

A run is planned once (``flow/launcher.plan_roles``): one ``ReplicaPlan`` per replica, carrying the
role's own config, its run-level arguments (the role's ``*Args`` dataclass, declared beside its
``serve`` in ``roles/``) and the ``Wiring`` every replica of the run shares. A placement (``local.py``,
``ray_cluster.py``) ships the plan to where the replica runs; ``worker.run_role`` turns it into a
``RoleContext`` and calls the role's serve function from ``roles.SERVE``. A restart reuses the plan with
the next incarnation, so a replica comes back exactly as it was first planned.

These records cross a process boundary only between the launcher and the processes (or Ray actors) it
started itself, by pickling; nothing a peer sends is ever unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Wiring:
    """Where everything of one run is, as every replica needs it."""

    bus: str  # the bus server's address
    control: str  # the launcher's control socket (reports and heartbeats go there)
    endpoints: dict  # how replicas find each other's sockets (``endpoints.make_endpoints``)
    keys: Any  # transfer.security.CurveKeys for sockets beyond loopback, held in memory: the launcher sends
    # None, and a Ray actor sets its own (``ray_cluster.own_keys``); None on one host
    model_path: str  # the checkpoint every role starts from (version 0)
    run_dir: str
    seed: int  # the run's seed; a replica's is seed + its index
    wait_seconds: float  # bound on any wait for data or weights that should arrive
    lease_seconds: float  # lease on rows taken from the bus
    steps: int  # flow.steps: the run's last policy version (a delivered row naming a later one is refused)
    heartbeat_s: float  # seconds between heartbeats
    launcher_pid: int  # a local replica dies with this process
    credentials: tuple[str, str] | None = None  # Ray: the launcher's credential service (address, public key),
    # where a replica fetches what ``credentials.split`` kept out of its plan
    env_actors: dict | None = None  # Ray: each environment worker is an actor with these options (ray.env.actors);
    # None: a rollout's environment workers are processes beside it


@dataclass(frozen=True)
class ReplicaPlan:
    """One replica of one role: everything ``worker.run_role`` needs to run it."""

    role: str  # a key of ``roles.SERVE``
    replica: int  # index among the role's replicas
    config: Any  # the role's config dataclass (RolloutConfig, RewardConfig, ReferenceConfig, ActorConfig)
    args: Any  # the role's run-level arguments (``ActorArgs``, ``RolloutArgs``, ``ReferenceArgs``) or None
    threads: int  # torch threads of the process
    wiring: Wiring | None = None  # set when the run's sockets exist (``Run._start``)
    incarnation: int = 0  # restarts of this replica so far
    bus_token: str | None = field(default=None, repr=False)  # its role's bus credential (roles/schema.grants)
    channel_secret: bytes | None = field(default=None, repr=False)  # the weight channel's key (schema.CHANNEL_ROLES)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica}"

    def replace(self, **changes) -> "ReplicaPlan":
        return dataclasses.replace(self, **changes)
