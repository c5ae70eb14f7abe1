"""Continuing a run: from which checkpoint, and what that checkpoint says was already trained.

Two ways in, one mechanism (``flow/launcher.py``):
- ``resume=true`` / ``resume=PATH``: a new launcher continues a run that was killed (or that finished,
  to train further with a larger ``flow.steps``), from its newest checkpoint or the one named.
- A rewind: the trainer of a live run died, and supervision restarts it from the newest checkpoint
  of this run (or from the start policy when it has none yet).

Either way the point to continue from is a ``ResumePoint``: the trainer's version N and the groups
steps 1..N consumed. The flow then clears the bus (rows not trained at N are regenerated: those a
policy newer than N produced must be), reissues every other group, and drops steps after N from the
ledger and from metrics.jsonl, so every sample is trained once in the lineage that survives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flow.config import ConfigError
from flow.feeder import group_index, uid
from roles.checkpoint import latest, read_state


@dataclass
class ResumePoint:
    path: str | None  # the checkpoint directory; None: the start policy (version 0, nothing trained)
    version: int = 0
    epoch: int = 0  # rewinds before this checkpoint was written
    groups_by_step: list[list[str]] = field(default_factory=list)

    def done_groups(self) -> set[int]:
        """Indices of the groups steps 1..version consumed."""
        return {group_index(g) for step in self.groups_by_step for g in step}

    def trained_by_step(self, group_size: int) -> dict[int, list[str]]:
        """Step -> the logical uids it trained (every sample of each group it consumed)."""
        return {s: [uid(group_index(g), j) for g in groups for j in range(group_size)]
                for s, groups in enumerate(self.groups_by_step, start=1)}


def point_of(path: Path) -> ResumePoint:
    state = read_state(path)
    return ResumePoint(str(path), state["version"], state["epoch"], state["groups_by_step"])


def newest_point(run_dir: str) -> ResumePoint:
    """Where a rewind of this run goes: its newest checkpoint, or the start."""
    path = latest(Path(run_dir) / "checkpoints")
    return ResumePoint(None) if path is None else point_of(path)


def requested_point(cfg) -> ResumePoint | None:
    """The point ``cfg.resume`` asks for (None: a fresh run); a ConfigError says what is wrong with it."""
    value = cfg.resume
    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in ("true", "latest"):
        path = latest(Path(cfg.run_dir) / "checkpoints")
        if path is None:
            raise ConfigError(f"resume: run_dir={cfg.run_dir!r} has no checkpoint to continue from; set run_dir to "
                              f"the run to continue (it holds checkpoints/), or give resume=PATH")
    else:
        given = Path(value)
        path = given if (given / "trainer_state.json").exists() else latest(given / "checkpoints") or latest(given)
        if path is None:
            raise ConfigError(f"resume={value!r}: not a checkpoint directory (no trainer_state.json) nor a run "
                              f"directory with checkpoints/")
    point = point_of(path)
    _require_fits(point, cfg)
    return point


def _require_fits(point: ResumePoint, cfg) -> None:
    if point.version >= cfg.flow.steps:
        raise ConfigError(f"resume: {point.path} is at step {point.version} and flow.steps={cfg.flow.steps}: nothing "
                          f"is left to train; raise flow.steps to train further")
    sizes = {len(groups) for groups in point.groups_by_step}
    if sizes and sizes != {cfg.actor.groups_per_step}:
        raise ConfigError(f"actor.groups_per_step: the checkpoint {point.path} trained {sorted(sizes)} groups per step; "
                          f"resume with actor.groups_per_step={max(sizes)} (steps and data positions depend on it)")
