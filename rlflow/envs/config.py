"""``env``: multi-turn episodes with an environment (``envs/base.py``). Torch-free, like every config module."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlflow.errors import require, require_counts, require_seconds

SCHEDULING = ("turn", "batch")


@dataclass
class EnvConfig:
    """The environment each episode runs against; with ``cls`` null every sample is one response (single-turn)."""

    cls: str | None = None
    """Dotted path to the environment class (reset(record), step(action); see rlflow/envs/base.py), e.g.
    rlflow.envs.tools.ToolEnv; null: single-turn, no environment."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the class, e.g. {tools: [rlflow.envs.tools.calc], format: call} for ToolEnv."""
    max_turns: int = 4
    """Most model turns per episode; an episode still going after them ends with finish_reason 'max_turns'."""
    max_observation_tokens: int = 64
    """Longest observation in tokens; a longer one is cut to this (the episode goes on)."""
    workers: int = 4
    """Environment worker processes per rollout replica; each runs one episode at a time, so this many
    episodes wait on their environments at once (more episodes queue for a worker)."""
    step_timeout_s: float = 30.0
    """Bound on one reset or step; past it the worker is killed and replaced, and the episode fails
    ('env_timeout')."""
    start_timeout_s: float = 120.0
    """Bound on a worker process starting (importing the environment's module)."""
    observation_role: str = "user"
    """With data.chat_template=true: the chat role observations are rendered as (user or tool)."""
    scheduling: str = "turn"
    """turn: episodes advance independently (a turn is generated as soon as its environment answered);
    batch: the baseline of simple loops, every episode of a batch waits for the slowest environment at
    each turn, and a new batch starts when the last episode ends (for comparison: benchmarks/agentic.py)."""
    failure_reward: float | None = None
    """Reward of an episode whose environment failed (timeout, exception, dead worker); null: the
    episode is not trained (counted as a failed sample)."""

    @property
    def enabled(self) -> bool:
        return self.cls is not None

    def check(self, at: str = "env") -> None:
        require(self.cls is None or "." in self.cls, f"{at}.cls",
                f"must be a dotted path like my_pkg.envs.MyEnv, got {self.cls!r}")
        require_counts(self, at, "max_turns", "max_observation_tokens", "workers")
        require_seconds(self, at, "step_timeout_s", "start_timeout_s")
        require(self.scheduling in SCHEDULING, f"{at}.scheduling", f"choose one of {SCHEDULING}, got {self.scheduling!r}")
        require(self.observation_role in ("user", "tool"), f"{at}.observation_role",
                f"choose user or tool, got {self.observation_role!r}")
        require(self.failure_reward is None or math.isfinite(self.failure_reward), f"{at}.failure_reward",
                f"must be a finite number or null (not trained), got {self.failure_reward}")
