"""The four role services (rollout, reward, reference, actor): each a loop over the bus with its config,
its run-level arguments and a ``serve(cfg, ctx, args)`` function; ``context.py`` is what they are given.

Roles know nothing of launching: ``flow/`` plans the replicas and a worker calls ``serve_function(role)``.
"""

from __future__ import annotations

import importlib
from typing import Callable

SERVE = {  # role -> the module whose ``serve(cfg, ctx, args)`` runs one replica of it
    "rollout": "rlflow.roles.rollout",
    "reward": "rlflow.roles.reward",
    "reference": "rlflow.roles.reference",
    "actor": "rlflow.roles.actor",
}
"""Imported only where the role runs, so a reward process never imports the trainer's modules."""


def serve_function(role: str) -> Callable:
    """The serve function of ``role`` (a key of ``SERVE``)."""
    if role not in SERVE:
        raise ValueError(f"no role {role!r}; the roles are {', '.join(SERVE)}")
    return importlib.import_module(SERVE[role]).serve
