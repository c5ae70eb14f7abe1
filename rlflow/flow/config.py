"""The run's typed configuration: one dataclass per component, composed by Hydra from ``recipes/``.

Each component owns its config (``RolloutConfig`` lives in ``roles/rollout.py``, ...); this module
composes them into ``RunConfig`` and registers it with Hydra's ConfigStore as ``rlflow_schema``, so a
misspelled key or a wrong type fails at compose time. ``validate`` then checks values and cross-field
rules, raising ``ConfigError`` (a ValueError) with the field's name and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rlflow.roles.actor import ActorConfig
from rlflow.algo.loss import ADVANTAGES, AGGREGATIONS, OLD_LOGPROBS, RATIO_LEVELS
from rlflow.algo.offpolicy import CORRECTIONS, LEVELS, LR_RULES
from rlflow.roles.reference import ReferenceConfig
from rlflow.roles.reward import RewardConfig
from rlflow.roles.rollout import RolloutConfig
from rlflow.engines.tiny import TinyModelConfig
from rlflow.sync.weights import SyncConfig
from rlflow.flow.placement.supervisor import SupervisionConfig

DTYPES = ("float32", "bfloat16", "float16")
WANDB_MODES = ("auto", "online", "offline")
LAUNCHERS = ("local", "ray")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ModelConfig:
    """The start policy (version 0): a checkpoint, or a tiny model built here."""

    path: str | None = None
    """A Hugging Face checkpoint directory (config.json, weights, tokenizer); null: build `tiny`."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape and warm-start of the locally built model (when path is null)."""
    cache_dir: str | None = None
    """Where built tiny models are cached; null: $XDG_CACHE_HOME/rlflow/models or ~/.cache/rlflow/models."""


@dataclass
class DataConfig:
    """Where prompts come from: a built-in synthetic task, or a user's jsonl/parquet file."""

    task: str | None = "reverse"
    """Built-in task (reverse | sort | add); ignored when `path` is set."""
    path: str | None = None
    """A .jsonl or .parquet file of prompt records; every other column reaches the reward as a field."""
    prompt_key: str = "prompt"
    """Column of `path` holding the prompt text."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template as a user turn (for instruct checkpoints)."""
    min_digits: int = 3
    """Built-in tasks: shortest operand in digits."""
    max_digits: int = 5
    """Built-in tasks: longest operand in digits."""
    seed: int = 0
    """Seed of the task generator or of the file's shuffling (each epoch reshuffles)."""


@dataclass
class FlowConfig:
    """Orchestration: how long, how stale, how long any wait may last."""

    steps: int = 300
    """Optimizer steps (policy versions) to train."""
    staleness: int | None = 1
    """0: strictly on-policy; k: no sample trains with staleness > k; null: fully asynchronous."""
    async_queue_steps: int = 2
    """With staleness null: steps of prompts admitted ahead of the trainer (bounds memory, not staleness)."""
    wait_seconds: float = 600.0
    """Bound on any wait for data or weights that should arrive; then the run fails naming the wait."""
    lease_seconds: float = 600.0
    """Lease on rows a role takes from the bus; unacked rows return to other replicas after it."""
    bus_capacity_rows: int = 65536
    """Rows the bus holds at most; producers wait when it is full."""
    bus_capacity_bytes: int = 2 << 30
    """Bytes the bus holds at most."""
    shutdown_seconds: float = 10.0
    """How long roles get to exit after SIGTERM before they are killed."""


@dataclass
class TrackingConfig:
    """Where metrics go: run_dir/metrics.jsonl always, Weights & Biases, and the console."""

    wandb: bool = True
    """Log to Weights & Biases (false: off)."""
    wandb_mode: str = "auto"
    """auto: online when an API key is configured, else offline; or online | offline."""
    project: str = "rlflow"
    """W&B project."""
    name: str | None = None
    """W&B run name; null: the run directory's name."""
    progress: bool = True
    """Live progress bar on a terminal (log lines every `log_every` steps otherwise)."""
    log_every: int = 10
    """Steps between console log lines when there is no terminal."""
    report: bool = True
    """Write run_dir/report (figures, trace.json, capacity advice) when the run ends, and print the advice."""
    figures_every: int = 50
    """Steps between the report's figures sent to W&B while the run goes (drawn on a thread; 0: at the end only)."""
    samples_every: int = 10
    """Steps between samples (one group's prompt, responses, rewards) logged to samples.jsonl and a W&B table (0: never)."""


@dataclass
class RoleResources:
    """What one replica of a role asks the Ray scheduler for (launcher=ray; the local launcher ignores it)."""

    cpus: float = 1.0
    """Logical CPUs per replica (Ray also sets OMP_NUM_THREADS from it; torch threads stay `<role>.threads`)."""
    gpus: float = 0.0
    """GPUs per replica; Ray sets CUDA_VISIBLE_DEVICES, so `<role>.device=cuda` is the replica's own GPU(s)."""
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {inference_node: 1} to pin rollouts to labelled nodes."""


@dataclass
class RayConfig:
    """launcher=ray: where the cluster is and what each role replica asks of it."""

    address: str | None = None
    """Join this cluster (`auto`, `ray://head:10001`, `head:6379`); null: start a private local cluster."""
    num_cpus: int | None = None
    """Private cluster only: its logical CPUs; null: this machine's cores, or what the roles ask if more."""
    num_gpus: int | None = None
    """Private cluster only: its GPUs; null: what Ray detects."""
    resources: dict[str, float] = field(default_factory=dict)
    """Private cluster only: custom resources of its one node (for roles' `custom` requests)."""
    object_store_mb: int = 128
    """Private cluster only: the object store's size (rlflow moves data over its own bus, not this)."""
    placement: str | None = None
    """One placement group over the bus and every replica: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (null: none)."""
    start_timeout: float = 120.0
    """Bound on the cluster placing and starting every role actor; then the run fails naming what is pending."""
    runtime_env: dict = field(default_factory=dict)
    """Ray runtime_env for every actor (e.g. {working_dir: ., pip: [...]}) when joining a cluster."""
    bus: RoleResources = field(default_factory=RoleResources)
    """The bus server's request."""
    actor: RoleResources = field(default_factory=RoleResources)
    """The trainer's request (add gpus for a GPU trainer)."""
    rollout: RoleResources = field(default_factory=RoleResources)
    """Each rollout replica's request."""
    reward: RoleResources = field(default_factory=RoleResources)
    """Each reward replica's request."""
    reference: RoleResources = field(default_factory=RoleResources)
    """Each reference replica's request."""


@dataclass
class RunConfig:
    """One training run. `rlflow key=value ...` overrides any field."""

    run_dir: str = "runs/${now:%Y-%m-%d_%H-%M-%S}"
    """Where the run writes config.yaml, metrics.jsonl, checkpoints/ and wandb/."""
    seed: int = 0
    """Base seed; roles add their replica index."""
    resume: str | None = None
    """true: continue the run in run_dir from its newest checkpoint; PATH: from that checkpoint (or that run
    directory's newest); null: a fresh run. Steps after the checkpoint are trained again, none twice."""
    launcher: str = "local"
    """local: every role a process of this machine; ray: every role replica a Ray actor (see `ray`)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster and per-role resources for launcher=ray."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlflow_schema", node=RunConfig)


def check_recipe(name: str) -> None:
    """Refuse a ``-cn`` that names no shipped recipe, listing those there are."""
    from rlflow import recipes

    if name not in recipes.names():
        raise ConfigError(f"-cn {name}: no such recipe; the recipes are {', '.join(recipes.names())} (recipes/*.yaml; "
                          f"-cd DIR -cn NAME takes your own DIR/NAME.yaml)")


class ConfigError(ValueError):
    """A bad recipe value; the message names the field and the fix."""


class StartError(RuntimeError):
    """The run could not place or start its parts (e.g. no Ray node meets a request); the message says which."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: RunConfig) -> None:
    """Check values and cross-field rules; raise ConfigError naming the field and the fix."""
    _validate_run(cfg)
    _validate_sync(cfg)
    _validate_actor(cfg.actor)
    _validate_data(cfg)
    _require(cfg.launcher in LAUNCHERS, "launcher", f"choose one of {LAUNCHERS}, got {cfg.launcher!r}")
    if cfg.launcher == "ray":
        _validate_ray(cfg)
    _require(cfg.tracking.figures_every >= 0, "tracking.figures_every", "must be >= 0 (0: figures at the end only)")
    _require(cfg.tracking.samples_every >= 0, "tracking.samples_every", "must be >= 0 (0: no samples)")
    _require(cfg.tracking.wandb_mode in WANDB_MODES, "tracking.wandb_mode",
             f"choose one of {WANDB_MODES}, got {cfg.tracking.wandb_mode!r}")


def _validate_run(cfg: RunConfig) -> None:
    """Flow bounds, rollout sampling, replica and thread counts, dtypes."""
    f, r, a = cfg.flow, cfg.rollout, cfg.actor
    _require(f.steps >= 1, "flow.steps", f"must be >= 1, got {f.steps}")
    _require(f.staleness is None or f.staleness >= 0, "flow.staleness",
             f"must be >= 0 (0: on-policy) or null (fully async), got {f.staleness}")
    _require(f.async_queue_steps >= 1, "flow.async_queue_steps", f"must be >= 1, got {f.async_queue_steps}")
    _require(f.wait_seconds > 0 and f.lease_seconds > 0, "flow.wait_seconds/lease_seconds", "must be > 0")
    sv = cfg.supervision
    _require(sv.max_restarts >= 0 and sv.restart_window_s > 0, "supervision.max_restarts/restart_window_s",
             f"need max_restarts >= 0 and restart_window_s > 0, got {sv.max_restarts}, {sv.restart_window_s}")
    _require(0 < sv.heartbeat_s < sv.hang_s, "supervision.heartbeat_s/hang_s",
             f"need 0 < heartbeat_s < hang_s (a few heartbeats may be late before a replica counts as hung), "
             f"got {sv.heartbeat_s}, {sv.hang_s}")
    _require(cfg.reward.max_failed_steps >= 0, "reward.max_failed_steps",
             f"must be >= 0 (0: never stop for failing rewards), got {cfg.reward.max_failed_steps}")
    _require(r.group_size >= 2, "rollout.group_size", f"group advantages need >= 2 samples per prompt, got {r.group_size}")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0 (logprobs of a greedy policy are "
             f"degenerate), got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    for name, value in (("rollout.replicas", r.replicas), ("reward.replicas", cfg.reward.replicas),
                        ("reference.replicas", cfg.reference.replicas), ("rollout.threads", r.threads),
                        ("actor.threads", a.threads), ("actor.groups_per_step", a.groups_per_step),
                        ("actor.replicas", a.replicas),
                        ("rollout.groups_per_call", r.groups_per_call), ("actor.micro_batch", a.micro_batch)):
        _require(value >= 1, name, f"must be >= 1, got {value}")
    for name, value in (("rollout.dtype", r.dtype), ("reference.dtype", cfg.reference.dtype)):
        _require(value in DTYPES, name, f"choose one of {DTYPES}, got {value!r}")


def _validate_sync(cfg: RunConfig) -> None:
    """Weight sync, and how weights reach an sglang engine."""
    r, a = cfg.rollout, cfg.actor
    sy = cfg.sync
    _require(sy.dtype is None or sy.dtype == r.dtype, "sync.dtype",
             f"patches are applied to the rollout's weights as they are: leave it null or equal to "
             f"rollout.dtype ({r.dtype!r}), got {sy.dtype!r}")
    _require(sy.values in ("new", "xor"), "sync.values", f"choose 'new' or 'xor', got {sy.values!r}")
    _require(sy.fanout >= 0, "sync.fanout", f"must be >= 0 (0: every replica pulls from the actor, 1: a chain), got {sy.fanout}")
    for name, value in (("sync.chunk_kb", sy.chunk_kb), ("sync.window", sy.window)):
        _require(value >= 1, name, f"must be >= 1, got {value}")
    _require(sy.keyframe_ratio > 0 and sy.hop_timeout > 0 and sy.uplink_mb_s >= 0,
             "sync.keyframe_ratio/hop_timeout/uplink_mb_s", "need keyframe_ratio > 0, hop_timeout > 0, uplink_mb_s >= 0")
    if r.engine == "sglang":
        _validate_sglang(r)
        _require(r.sglang.update != "distributed" or r.sglang.url is not None or a.device.startswith("cuda"),
                 "actor.device", "rollout.sglang.update=distributed broadcasts from the trainer's GPU to the "
                 "servers' GPUs over NCCL: set actor.device=cuda (or update=disk)")


def _validate_actor(a: ActorConfig) -> None:
    """The algorithm: advantages, corrections, VCPO, the optimizer, trainer replicas."""
    _require(a.replicas < 1 or a.groups_per_step % a.replicas == 0, "actor.replicas",
             f"each trainer replica takes groups_per_step / replicas groups: {a.groups_per_step} groups do not "
             f"split over {a.replicas} replicas; make actor.groups_per_step a multiple of actor.replicas")
    _require(a.advantage in ADVANTAGES, "actor.advantage", f"choose one of {ADVANTAGES}, got {a.advantage!r}")
    _require(a.aggregation in AGGREGATIONS, "actor.aggregation", f"choose one of {AGGREGATIONS}, got {a.aggregation!r}")
    _require(a.old_logprobs in OLD_LOGPROBS, "actor.old_logprobs", f"choose one of {OLD_LOGPROBS}, got {a.old_logprobs!r}")
    _require(a.ratio_level in RATIO_LEVELS, "actor.ratio_level", f"choose one of {RATIO_LEVELS}, got {a.ratio_level!r}")
    _require(a.correction in CORRECTIONS, "actor.correction", f"choose one of {CORRECTIONS}, got {a.correction!r}")
    _require(a.correction == "none" or a.old_logprobs == "recompute", "actor.correction",
             f"{a.correction!r} weights need actor.old_logprobs=recompute (with 'rollout' the ratio π/μ is "
             f"already the importance weight): set both, or actor.correction=none")
    _require(a.correction_level in LEVELS, "actor.correction_level", f"choose one of {LEVELS}, got {a.correction_level!r}")
    _require(a.is_cap > 1, "actor.is_cap", f"must be > 1 (weights are cut at C, or outside [1/C, C]), got {a.is_cap}")
    _require(a.vcpo_rule in LR_RULES, "actor.vcpo_rule", f"choose one of {LR_RULES}, got {a.vcpo_rule!r}")
    _require(0 < a.vcpo_ref <= 1, "actor.vcpo_ref", f"must be in (0, 1] (an ESS ratio), got {a.vcpo_ref}")
    _require(a.lr > 0, "actor.lr", f"must be > 0, got {a.lr}")
    _require(0 <= a.clip_low < 1 and a.clip_high >= 0, "actor.clip_low/clip_high",
             f"need 0 <= clip_low < 1 and clip_high >= 0, got {a.clip_low}, {a.clip_high}")
    _require(a.kl_coef >= 0, "actor.kl_coef", f"must be >= 0, got {a.kl_coef}")


def _validate_data(cfg: RunConfig) -> None:
    """Where prompts come from, and the model that can answer them."""
    from rlflow.tasks.builtin import TASKS

    d = cfg.data
    if d.path is None:
        _require(d.task is not None, "data.path", "this recipe has no built-in task: give a prompt file, "
                 "data.path=FILE.jsonl|parquet")
        _require(d.task in TASKS, "data.task", f"choose one of {sorted(TASKS)} or give data.path, got {d.task!r}")
        _require(1 <= d.min_digits <= d.max_digits, "data.min_digits/max_digits",
                 f"need 1 <= min_digits <= max_digits, got {d.min_digits}, {d.max_digits}")
    else:
        _require(os.path.isfile(d.path), "data.path", f"no such file: {d.path!r}")
        _require(d.path.endswith((".jsonl", ".parquet")), "data.path", f"must end in .jsonl or .parquet, got {d.path!r}")
        _require(cfg.reward.fn is not None, "reward.fn", "a dataset from data.path needs a reward: "
                 "reward.fn=my_pkg.my_reward (or rlflow.tasks.rewards.math_answer, rlflow.tasks.rewards.exact_match)")
    if cfg.model.path is not None:
        problem = checkpoint_problem(cfg.model.path)
        _require(problem is None, "model.path", f"{cfg.model.path!r} {problem}")
    else:
        _require(not d.chat_template, "model.path", "data.chat_template=true needs a checkpoint whose tokenizer has "
                 "a chat template, and the tiny model built here has none: give model.path=CHECKPOINT_DIR (or set "
                 "data.chat_template=false)")


CHECKPOINT_FILES = "config.json, the weights (*.safetensors or *.bin) and the tokenizer's files"


def checkpoint_problem(path: str) -> str | None:
    """What keeps directory ``path`` from being a Hugging Face checkpoint rlflow can start from (None: nothing).

    Only the files are looked at (quick, no import); ``rlflow doctor`` also loads the config and tokenizer."""
    from pathlib import Path

    p = Path(path)
    if not p.is_dir():
        return f"is not a directory: give a checkpoint directory holding {CHECKPOINT_FILES}"
    if not (p / "config.json").is_file():
        return f"holds no config.json: a checkpoint directory holds {CHECKPOINT_FILES} (a run's own are in " \
               f"RUN_DIR/checkpoints/final)"
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        return "holds no weights (*.safetensors or *.bin)"
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return "holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json): save the tokenizer beside the model"
    return None


def _validate_sglang(r: RolloutConfig) -> None:
    from rlflow.engines.sglang import UPDATES

    sg = r.sglang
    _require(sg.url is not None or r.device.startswith("cuda"), "rollout.sglang.url",
             f"rollout.engine=sglang launches an sglang server per replica, which needs a GPU: set "
             f"rollout.device=cuda on a GPU host, or give the URL of a running server (rollout.device={r.device!r})")
    _require(sg.url is None or sg.url.startswith(("http://", "https://")), "rollout.sglang.url",
             f"must be http://HOST:PORT, got {sg.url!r}")
    _require(sg.url is None or r.replicas == 1, "rollout.sglang.url",
             f"{r.replicas} replicas would share one server and update each other's weights: give each "
             f"replica its own server (leave url null) or use rollout.replicas=1")
    _require(sg.update in UPDATES, "rollout.sglang.update", f"choose one of {UPDATES}, got {sg.update!r}")
    _require(sg.tp_size >= 1 and sg.max_retries >= 0 and sg.bucket_mb >= 1, "rollout.sglang.tp_size/max_retries/bucket_mb",
             f"need tp_size >= 1, max_retries >= 0, bucket_mb >= 1, got {sg.tp_size}, {sg.max_retries}, {sg.bucket_mb}")
    _require(min(sg.startup_timeout, sg.request_timeout, sg.flush_timeout) > 0,
             "rollout.sglang.startup_timeout/request_timeout/flush_timeout", "must be > 0")


def _validate_ray(cfg: RunConfig) -> None:
    ray_cfg = cfg.ray
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("launcher: launcher=ray needs Ray installed: pip install 'rlflow[ray]' "
                          "(or run with launcher=local)") from None
    _require(ray_cfg.placement is None or ray_cfg.placement in PLACEMENTS, "ray.placement",
             f"choose one of {PLACEMENTS} or null, got {ray_cfg.placement!r}")
    _require(ray_cfg.start_timeout > 0, "ray.start_timeout", f"must be > 0, got {ray_cfg.start_timeout}")
    _require(ray_cfg.object_store_mb >= 80, "ray.object_store_mb", f"Ray needs at least 80, got {ray_cfg.object_store_mb}")
    for role in ("bus", "actor", "rollout", "reward", "reference"):
        res: RoleResources = getattr(ray_cfg, role)
        _require(res.cpus >= 0 and res.gpus >= 0 and all(v >= 0 for v in res.custom.values()),
                 f"ray.{role}", f"resource requests must be >= 0, got cpus={res.cpus} gpus={res.gpus} custom={res.custom}")
        if ray_cfg.placement is not None:
            _require(res.cpus > 0 or res.gpus > 0 or any(res.custom.values()), f"ray.{role}",
                     "a placement group bundle cannot be empty: give it cpus > 0 (or gpus/custom)")
    for role in ("actor", "rollout", "reference") if cfg.actor.kl_coef > 0 else ("actor", "rollout"):
        device = getattr(cfg, role).device
        _require(not device.startswith("cuda") or getattr(ray_cfg, role).gpus > 0, f"ray.{role}.gpus",
                 f"{role}.device={device!r} but ray.{role}.gpus=0: Ray hides every GPU from an actor that asks "
                 f"for none; set ray.{role}.gpus=1 (or {role}.device=cpu)")
