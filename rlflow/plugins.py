"""Plug-ins by dotted path: a recipe names user code (``reward.fn``, ``rollout.engine``, ``actor.engine``)
as ``pkg.module.name``; ``load_object`` imports it, and a bad path is an error naming the recipe field.

Paths of rlflow's own code from before the ``rlflow`` package (``roles.rewards.math_answer``) are refused
with the path they moved to, so an old recipe fails at start with its fix instead of an import error.
"""

from __future__ import annotations

import importlib
from typing import Any

MOVED = {  # module of an rlflow dotted path before the rlflow package -> where it lives now
    "roles.rewards": "rlflow.tasks.rewards", "roles.tasks": "rlflow.tasks.builtin",
    "roles.hf": "rlflow.engines.hf", "roles.sglang_engine": "rlflow.engines.sglang",
    "roles.tiny": "rlflow.engines.tiny", "roles.loss": "rlflow.algo.loss", "roles.offpolicy": "rlflow.algo.offpolicy",
}


def load_object(path: str, what: str) -> Any:
    """Import ``pkg.module.name``; a bad path is a ValueError naming the recipe field ``what``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{what}={path!r} is not a dotted path like my_pkg.module.name")
    if module_name in MOVED:
        raise ValueError(f"{what}={path!r}: rlflow's modules moved into the rlflow package; "
                         f"use {what}={MOVED[module_name]}.{attr}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what}={path!r}: cannot import module {module_name!r} ({e}); "
                         f"is it installed or on PYTHONPATH?") from e
    if not hasattr(module, attr):
        raise ValueError(f"{what}={path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
