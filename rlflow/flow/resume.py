"""Continuing a run: from which checkpoint, and what that checkpoint says was already trained.

Two ways in, one mechanism (``flow/launcher.py``):
- ``resume=true`` / ``resume=PATH``: a new launcher continues a run that was killed (or that finished,
  to train further with a larger ``flow.steps``), from its newest checkpoint or the one named.
- A rewind: the trainer of a live run died, and supervision restarts it from the newest checkpoint
  of this run (or from the start policy when it has none yet).

A resumed run continues the experiment its own ``config.yaml`` describes (``resume_settings``): the
recipe's defaults are not composed again, or a run started with ``data.path=... reward.fn=...`` would
go on training the recipe's built-in task. Overrides on the resume command line apply on top where
``flow/overrides.RESUMABLE`` allows (more steps, replicas, logging); one that would change the
experiment is refused naming the field, unless it gives the field its saved value (so the original
command line may be repeated whole). The saved file is only ever rewritten with those safe changes,
and each resume adds a line to ``resumes.jsonl`` (when, from where, what changed).

Either way the point to continue from is a ``ResumePoint``: the trainer's version N and the groups
steps 1..N consumed. The flow then clears the bus (rows not trained at N are regenerated: those a
policy newer than N produced must be), reissues every other group, and drops steps after N from the
ledger and from metrics.jsonl, so every sample is trained once in the lineage that survives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlflow.flow.config import ConfigError
from rlflow.flow.feeder import group_index, group_uids, logical_group, logical_uid
from rlflow.train.checkpoint import latest, read_state


@dataclass
class ResumePoint:
    path: str | None  # the checkpoint directory; None: the start policy (version 0, nothing trained)
    version: int = 0
    epoch: int = 0  # rewinds before this checkpoint was written
    groups_by_step: list[list[str]] = field(default_factory=list)
    skipped_by_step: list[list[str]] = field(default_factory=list)  # uids each step consumed without training
    filtered_by_step: list[list[str]] = field(default_factory=list)  # those of them dynamic sampling dropped

    def done_groups(self) -> set[int]:
        """Indices of the main stream's groups steps 1..version consumed."""
        return {i for step in self.groups_by_step for g in step if (i := group_index(g)) is not None}

    def done_replacements(self) -> set[str]:
        """Logical ids of the replacement groups (dynamic sampling) steps 1..version consumed."""
        return {logical_group(g) for step in self.groups_by_step for g in step if group_index(g) is None}

    def trained_by_step(self, group_size: int) -> dict[int, list[str]]:
        """Step -> the logical uids it trained (every sample of each group it consumed, but the skipped)."""
        skipped = self.skipped()
        return {s: [u for g in groups for u in group_uids(g, group_size) if u not in skipped.get(s, ())]
                for s, groups in enumerate(self.groups_by_step, start=1)}

    def skipped(self) -> dict[int, list[str]]:
        """Step -> the logical uids it consumed without training them."""
        return {s: [logical_uid(u) for u in uids] for s, uids in enumerate(self.skipped_by_step, start=1)}

    def filtered(self) -> dict[int, list[str]]:
        """Step -> the logical uids dynamic sampling dropped (a subset of ``skipped``)."""
        return {s: [logical_uid(u) for u in uids] for s, uids in enumerate(self.filtered_by_step, start=1)}


def point_of(path: Path) -> ResumePoint:
    try:
        state = read_state(path)
    except ValueError as e:  # not a checkpoint, or a damaged one
        raise ConfigError(f"resume: {e}") from None
    return ResumePoint(str(path), state["version"], state["epoch"], state["groups_by_step"],
                       state.get("skipped_by_step", []), state.get("filtered_by_step", []))


def newest_point(run_dir: str) -> ResumePoint:
    """Where a rewind of this run goes: its newest checkpoint, or the start."""
    path = latest(Path(run_dir) / "checkpoints")
    return ResumePoint(None) if path is None else point_of(path)


def resuming(value) -> bool:
    """Whether ``resume`` (a recipe value, possibly a string) asks to continue a run."""
    return value is not None and str(value).lower() not in ("false", "none", "")


def locate(value, run_dir: str) -> Path:
    """The checkpoint directory ``resume=value`` names (for ``true``: the newest of ``run_dir``)."""
    if str(value).lower() in ("true", "latest"):
        path = latest(Path(run_dir) / "checkpoints")
        if path is None:
            raise ConfigError(f"resume: run_dir={run_dir!r} has no checkpoint to continue from; set run_dir to "
                              f"the run to continue (it holds checkpoints/), or give resume=PATH")
        return path
    given = Path(value)
    path = given if (given / "trainer_state.json").exists() else latest(given / "checkpoints") or latest(given)
    if path is None:
        raise ConfigError(f"resume={value!r}: not a checkpoint directory (no trainer_state.json) nor a run "
                          f"directory with checkpoints/")
    return path


def requested_point(cfg) -> ResumePoint | None:
    """The point ``cfg.resume`` asks for (None: a fresh run); a ConfigError says what is wrong with it."""
    if not resuming(cfg.resume):
        return None
    point = point_of(locate(cfg.resume, cfg.run_dir))
    _require_fits(point, cfg)
    _require_lineage(point, Path(cfg.run_dir))
    return point


def _require_lineage(point: ResumePoint, run_dir: Path) -> None:
    """A resume writes on in ``run_dir``: only from its newest checkpoint, or into a directory holding no run.

    Continuing run X from an older checkpoint of its own would leave X's newer checkpoints in place for a
    later rewind to pick (another lineage); continuing into a directory that holds another run would mix
    the two runs' metrics and checkpoints. Either is refused, with the way to branch instead."""
    branch = "to branch from it, resume into a new run_dir (leave run_dir unset: a new directory is made)"
    ours = Path(point.path).resolve().parent == (run_dir / "checkpoints").resolve()
    newest = newest_point(str(run_dir))
    if ours and newest.version > point.version:
        raise ConfigError(f"resume={point.path}: run_dir={str(run_dir)!r} has a newer checkpoint "
                          f"({Path(newest.path).name}, step {newest.version}) than this one (step {point.version}), "
                          f"and a run continues from its newest; {branch}")
    metrics = run_dir / "metrics.jsonl"
    if not ours and metrics.exists() and metrics.stat().st_size:
        raise ConfigError(f"resume={point.path}: run_dir={str(run_dir)!r} holds another run (its metrics.jsonl); "
                          f"continue a run in its own directory, or {branch}")


@dataclass
class Resumed:
    """Where a resumed run's settings came from and what its command line changed."""

    saved: Path | None  # the config.yaml the run continues (None: none was found beside the checkpoint)
    checkpoint: Path
    changed: dict[str, list]  # key -> [saved value, new value], RESUMABLE keys only


def resume_settings(dcfg, overrides: list[str]):
    """``(config, Resumed | None)``: for a resume, the saved run's config with the command line's safe
    ``overrides`` on top (ConfigError naming any unsafe one); otherwise ``dcfg`` as composed."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rlflow.flow.config import RunConfig
    from rlflow.flow.overrides import parse, resumable, retire

    if not resuming(dcfg.resume):
        return dcfg, None
    checkpoint = locate(dcfg.resume, dcfg.run_dir)
    saved_path = next((d / "config.yaml" for d in (checkpoint.parent.parent, checkpoint)
                       if (d / "config.yaml").is_file()), None)
    if saved_path is None:  # a checkpoint copied out of its run: the command line is all there is
        return dcfg, Resumed(None, checkpoint, {})
    try:
        loaded = OmegaConf.load(saved_path)
        retire(loaded, saved_path)
        saved = OmegaConf.merge(OmegaConf.structured(RunConfig), loaded)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"resume: {saved_path} does not fit this version of rlflow's settings ({e}); start a new "
                          f"run from the checkpoint's weights instead: model.path={checkpoint}") from None
    changed, refused = {}, []
    for o in parse(overrides):
        old, new = _value(saved, o.key), _value(dcfg, o.key)
        if o.key in ("resume", "run_dir") or old == new:
            continue
        if resumable(o.key):
            changed[o.key] = [old, new]
        else:
            refused.append(f"{o.key}={new!r} (the run has {old!r})")
    if refused:
        raise ConfigError(f"resume: {', '.join(refused)} would change the run's experiment; a resume continues the "
                          f"settings in {saved_path} and may change only how long, how fast, where or how observably "
                          f"it runs (more steps, replicas, devices, logging). To train with other settings from these "
                          f"weights, start a new run: model.path={checkpoint}")
    merged = saved
    for key in [*changed, "resume", "run_dir"]:
        OmegaConf.update(merged, key, _value(dcfg, key), merge=False)
    return merged, Resumed(saved_path, checkpoint, changed)


def _value(cfg, key: str):
    from omegaconf import Container, OmegaConf

    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size")
"""config.json fields a checkpoint must share with the start model: rollouts and the reference start from
the start model and take the trainer's weights by name and shape."""


def require_same_shape(checkpoint: str, model_path: str) -> None:
    """Refuse to resume a checkpoint whose model is not the start model's shape (a ConfigError naming both)."""
    def config(path: str) -> dict:
        try:
            return json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError):
            return {}

    ours, start = config(checkpoint), config(model_path)
    differ = [f"{k} {ours.get(k)} against {start.get(k)}" for k in SHAPE if ours.get(k) != start.get(k)]
    if differ:
        raise ConfigError(f"resume: the checkpoint {checkpoint} is not of the start model {model_path} ({'; '.join(differ)}); "
                          f"the rollouts and the reference start from the start model and could not take its weights. "
                          f"(The tiny model built here has a byte tokenizer since 2026-12-01: a run of it from before "
                          f"cannot be resumed.) Start a new run from the checkpoint's weights: model.path={checkpoint}")


def record_resume(run_dir: Path, resumed: Resumed, version: int) -> None:
    """One line of ``run_dir/resumes.jsonl``: when, from which checkpoint (at which step), what changed."""
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(resumed.checkpoint),
                            "step": version, "config": str(resumed.saved) if resumed.saved else None,
                            "changed": resumed.changed}, default=str) + "\n")


def _require_fits(point: ResumePoint, cfg) -> None:
    if point.version >= cfg.flow.steps:
        raise ConfigError(f"resume: {point.path} is at step {point.version} and flow.steps={cfg.flow.steps}: nothing "
                          f"is left to train; raise flow.steps to train further")
    sizes = {sum(group_index(g) is not None for g in groups) for groups in point.groups_by_step}  # replacements aside
    if sizes and sizes != {cfg.actor.groups_per_step}:
        raise ConfigError(f"actor.groups_per_step: the checkpoint {point.path} trained {sorted(sizes)} groups per step; "
                          f"resume with actor.groups_per_step={max(sizes)} (steps and data positions depend on it)")
