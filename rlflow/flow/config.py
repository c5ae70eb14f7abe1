"""The run's typed configuration: one dataclass per component, composed by Hydra from ``recipes/``.

Each component owns its config and checks its own fields in a ``check`` method below their declaration
(the roles' in ``roles/config.py``, weight sync's in ``sync/config.py``, the engines' in
``engines/config.py``, supervision's in ``flow/placement/supervisor.py``, the run-level ones here). This
module composes them into ``RunConfig``, registers it with Hydra's ConfigStore as ``rlflow_schema`` (a
misspelled key or a wrong type fails at compose time) and keeps only the rules that tie two components
together (``RunConfig.check``). Every error is a ``ConfigError`` naming the key and the fix. Torch-free:
the launcher checks a run without importing torch, while the roles' forkserver imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from rlflow.engines.config import TinyModelConfig
from rlflow.envs.config import EnvConfig
from rlflow.errors import ConfigError, require, require_counts, require_seconds
from rlflow.flow.placement.supervisor import SupervisionConfig
from rlflow.roles.config import ActorConfig, ReferenceConfig, RewardConfig, RolloutConfig
from rlflow.sync.config import SyncConfig

__all__ = ["ConfigError", "RunConfig", "StartError", "check_recipe", "register"]

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

    def check(self, at: str = "model") -> None:
        if self.path is None:
            self.tiny.check(f"{at}.tiny")
            return
        problem = checkpoint_problem(self.path)
        require(problem is None, f"{at}.path", f"{self.path!r} {problem}")


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
        if (p / "dcp").is_dir():  # a sharded trainer's checkpoint: its weights are every rank's rows
            return f"is a sharded checkpoint (its weights are in dcp/): make a from_pretrained directory of it " \
                   f"with `rlflow export {path} OUT_DIR` and give model.path=OUT_DIR"
        if (p / "adapter").is_dir():  # a LoRA trainer's checkpoint: adapters for a base model
            return f"is a LoRA checkpoint (adapters in adapter/, for a base model): merge them into a " \
                   f"from_pretrained directory with `rlflow export {path} OUT_DIR` and give model.path=OUT_DIR " \
                   f"(a run with actor.lora.final=merged left one in checkpoints/final/merged)"
        return "holds no weights (*.safetensors or *.bin)"
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        return "holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json): save the tokenizer beside the model"
    return None


def require_data_file(path: str, at: str) -> None:
    """A prompt file the data reader takes: .jsonl, .parquet, or a directory `datasets` saved."""
    from rlflow.flow.data import is_saved_dataset

    if os.path.isdir(path):
        require(is_saved_dataset(path), at, f"{path!r} is a directory but not one a Hugging Face Dataset was saved "
                                            f"to (no state.json or dataset_dict.json)")
        return
    require(os.path.isfile(path), at, f"no such file: {path!r}")
    require(path.endswith((".jsonl", ".parquet")), at, f"must end in .jsonl or .parquet (or be a save_to_disk "
                                                        f"directory), got {path!r}")


@dataclass
class SourceConfig:
    """One source of a data mixture (``data.sources``): a file or a built-in task, its weight and reward."""

    name: str = ""
    """Its name: records carry it as their `data_source` field, metrics as source/<name>/...."""
    weight: float = 1.0
    """Its share of the prompts, relative to the other sources' weights."""
    path: str | None = None
    """A .jsonl or .parquet file, or a save_to_disk directory; null: the built-in `task`."""
    task: str | None = None
    """A built-in task (with path null); its digits are data.min_digits/max_digits."""
    prompt_key: str = "prompt"
    """Column of `path` holding the prompt text."""
    split: str = "train"
    """`path` is a saved DatasetDict: the split to read."""
    reward: str | None = None
    """Dotted path of its reward function; null: a task's own reward, a file's reward.fn."""

    def check(self, at: str) -> None:
        require(bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(), f"{at}.name",
                f"every source needs a name of letters, digits, - or _ (its metrics are source/<name>/...), got {self.name!r}")
        require(self.weight > 0, f"{at}.weight", f"must be > 0, got {self.weight}")
        require((self.path is None) != (self.task is None), f"{at}.path",
                "give a source either a path (a prompt file) or a built-in task, not both or neither")
        if self.path is not None:
            require_data_file(self.path, f"{at}.path")
        else:
            from rlflow.tasks.builtin import TASKS

            require(self.task in TASKS, f"{at}.task", f"choose one of {sorted(TASKS)}, got {self.task!r}")


@dataclass
class DataConfig:
    """Where prompts come from: a built-in synthetic task, or a user's jsonl/parquet file."""

    task: str | None = "reverse"
    """Built-in task (reverse | sort | add); ignored when `path` is set."""
    path: str | None = None
    """A .jsonl or .parquet file of prompt records, or a directory a Hugging Face Dataset or DatasetDict was
    saved to (save_to_disk); every other column reaches the reward as a field."""
    split: str = "train"
    """`path` is a saved DatasetDict: the split to read."""
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
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture of several files or tasks instead of `path`/`task`: each prompt is drawn from a source
    with probability its weight over the sum; each source may have its own reward, and metrics are
    reported per source (source/<name>/reward_mean, source/<name>/samples)."""
    curriculum: str | None = None
    """Dotted path to fn(record: dict, history: dict | None) -> bool, True to issue the prompt; history is
    None for a prompt not seen yet, else {"groups": times it was trained on, "reward_mean": its samples'
    mean reward}. E.g. rlflow.algo.filters.unsolved (pass over prompts every sample solved)."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO): a group `filter_fn` finds without signal (by default: every reward equal)
    is not trained, and the feeder issues a replacement for its step, so each step still trains
    actor.groups_per_step groups. Dropped groups count as filtered in the run's ledger."""
    filter_fn: str = "rlflow.algo.filters.rewards_differ"
    """filter_groups: dotted path to fn(rewards: list[float]) -> bool, True to keep (train) a group; it gets
    the group's scored rewards (a failed reward is skipped before it)."""
    filter_budget: float = 4.0
    """filter_groups: most replacements per step, in multiples of actor.groups_per_step; past it the step
    trains the groups it kept (metric filter/exhausted), so a task the policy has solved (or cannot
    solve at all) does not generate for ever."""

    def check(self, at: str = "data") -> None:
        require(self.filter_budget > 0, f"{at}.filter_budget",
                f"must be > 0 (replacements per step, in multiples of actor.groups_per_step), got {self.filter_budget}")
        if self.sources:
            require(self.path is None, f"{at}.path", f"give {at}.sources or {at}.path, not both: set {at}.path=null")
            names = [s.name for s in self.sources]
            require(len(set(names)) == len(names), f"{at}.sources", f"source names must differ, got {names}")
            for i, source in enumerate(self.sources):
                source.check(f"{at}.sources[{i}]")
            return
        if self.path is not None:
            require_data_file(self.path, f"{at}.path")
            return
        from rlflow.tasks.builtin import TASKS

        require(self.task is not None, f"{at}.path",
                f"this recipe has no built-in task: give a prompt file, {at}.path=FILE.jsonl|parquet")
        require(self.task in TASKS, f"{at}.task", f"choose one of {sorted(TASKS)} or give {at}.path, got {self.task!r}")
        require(1 <= self.min_digits <= self.max_digits, f"{at}.min_digits/max_digits",
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")


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

    def check(self, at: str = "flow") -> None:
        require(self.steps >= 1, f"{at}.steps", f"must be >= 1, got {self.steps}")
        require(self.staleness is None or self.staleness >= 0, f"{at}.staleness",
                f"must be >= 0 (0: on-policy) or null (fully async), got {self.staleness}")
        require_counts(self, at, "async_queue_steps", "bus_capacity_rows", "bus_capacity_bytes")
        require_seconds(self, at, "wait_seconds", "lease_seconds", "shutdown_seconds")


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

    def check(self, at: str = "tracking") -> None:
        require(self.wandb_mode in WANDB_MODES, f"{at}.wandb_mode", f"choose one of {WANDB_MODES}, got {self.wandb_mode!r}")
        require(self.log_every >= 1, f"{at}.log_every", f"must be >= 1, got {self.log_every}")
        require(self.figures_every >= 0, f"{at}.figures_every", "must be >= 0 (0: figures at the end only)")
        require(self.samples_every >= 0, f"{at}.samples_every", "must be >= 0 (0: no samples)")


@dataclass
class EvalConfig:
    """Periodic evaluation of the run's checkpoints on held-out prompts (``flow/periodic_eval.py``): what
    `rlflow eval CHECKPOINT` measures, in a process of its own while training goes on."""

    every: int = 0
    """Steps between evaluations (0: none); a multiple of actor.checkpoint_every. The last step is always
    evaluated (checkpoints/final)."""
    data: str | None = None
    """A held-out .jsonl or .parquet prompt file; null: the run's task with its own seed (a data.path run
    then scores the file's first `prompts` records: give held-out data here)."""
    prompts: int = 64
    """Prompts per evaluation."""
    samples: int = 4
    """Responses per prompt: pass@1 and pass@samples are reported."""
    seed: int = 1234
    """Sampling seed, and a built-in task's held-out prompt seed."""
    device: str = "cpu"
    """torch device of the evaluation's engine."""
    split: str = "train"
    """`data` is a saved DatasetDict: the split to score."""

    def check(self, at: str = "eval") -> None:
        require(self.every >= 0, f"{at}.every", f"must be >= 0 (0: no periodic evaluation), got {self.every}")
        require_counts(self, at, "prompts", "samples")
        if self.data is not None:
            require_data_file(self.data, f"{at}.data")


@dataclass
class RoleResources:
    """What one replica of a role asks the Ray scheduler for (launcher=ray; the local launcher ignores it)."""

    cpus: float = 1.0
    """Logical CPUs per replica (Ray also sets OMP_NUM_THREADS from it; torch threads stay `<role>.threads`)."""
    gpus: float = 0.0
    """GPUs per replica; Ray sets CUDA_VISIBLE_DEVICES, so `<role>.device=cuda` is the replica's own GPU(s)."""
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per replica, e.g. {inference_node: 1} to pin rollouts to labelled nodes."""

    def check(self, at: str) -> None:
        require(self.cpus >= 0 and self.gpus >= 0 and all(v >= 0 for v in self.custom.values()), at,
                f"resource requests must be >= 0, got cpus={self.cpus} gpus={self.gpus} custom={self.custom}")

    def empty(self) -> bool:
        return not (self.cpus > 0 or self.gpus > 0 or any(self.custom.values()))


@dataclass
class EnvWorkerResources(RoleResources):
    """A rollout replica's environment workers (env.workers) under launcher=ray."""

    actors: bool = False
    """true: each environment worker is a Ray actor with the request below, placed apart from its rollout
    replica (e.g. custom: {cpu_node: 1} keeps environments on CPU nodes); false: a process beside it."""


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
    env: EnvWorkerResources = field(default_factory=EnvWorkerResources)
    """Environment workers: processes beside their rollout replica, or Ray actors (env.actors=true) each
    with this request."""

    def check(self, at: str = "ray") -> None:
        require(self.placement is None or self.placement in PLACEMENTS, f"{at}.placement",
                f"choose one of {PLACEMENTS} or null, got {self.placement!r}")
        require(self.start_timeout > 0, f"{at}.start_timeout", f"must be > 0, got {self.start_timeout}")
        require(self.object_store_mb >= 80, f"{at}.object_store_mb", f"Ray needs at least 80, got {self.object_store_mb}")
        for role in ("bus", "actor", "rollout", "reward", "reference"):
            res: RoleResources = getattr(self, role)
            res.check(f"{at}.{role}")
            require(self.placement is None or not res.empty(), f"{at}.{role}",
                    "a placement group bundle cannot be empty: give it cpus > 0 (or gpus/custom)")
        self.env.check(f"{at}.env")


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
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn episodes against an environment (null cls: single-turn)."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation on held-out prompts (every: 0, off)."""

    def check(self) -> None:
        """Every component's own fields, then the rules between components; a ConfigError names the key."""
        for name in ("model", "data", "rollout", "reward", "reference", "actor", "env", "flow", "supervision",
                     "sync", "tracking", "eval"):
            getattr(self, name).check(name)
        require(self.launcher in LAUNCHERS, "launcher", f"choose one of {LAUNCHERS}, got {self.launcher!r}")
        if self.launcher == "ray":
            self.ray.check("ray")
            self._check_on_ray()
        self._check_between()

    def _check_between(self) -> None:
        """The rules that tie two components together."""
        r, a, d = self.rollout, self.actor, self.data
        require(self.sync.dtype is None or self.sync.dtype == r.dtype, "sync.dtype",
                f"patches are applied to the rollout's weights as they are: leave it null or equal to "
                f"rollout.dtype ({r.dtype!r}), got {self.sync.dtype!r}")
        require(r.engine != "sglang" or r.sglang.update != "distributed" or r.sglang.url is not None
                or a.device.startswith("cuda"), "actor.device",
                "rollout.sglang.update=distributed broadcasts from the trainer's GPU to the servers' GPUs over "
                "NCCL: set actor.device=cuda (or update=disk)")
        require(r.engine != "sglang" or not a.lora.enabled or r.sglang.update == "disk", "rollout.sglang.update",
                f"actor.lora.rank={a.lora.rank}: sglang takes the adapters through its LoRA API, from files (a few "
                f"MB a version), not by {r.sglang.update!r}: set rollout.sglang.update=disk")
        e = self.eval
        require(not e.every or (a.checkpoint_every and e.every % a.checkpoint_every == 0), "eval.every",
                f"evaluations score the step's checkpoint: eval.every={e.every} must be a multiple of "
                f"actor.checkpoint_every={a.checkpoint_every} (which must be > 0)")
        require(not e.every or not self.env.enabled, "eval.every",
                "periodic evaluation scores single-turn responses; this run's episodes are multi-turn: set eval.every=0")
        require(r.update != "in_flight" or not self.env.enabled, "rollout.update",
                "episodes (env.cls) take new weights between turns, and their tokens record their versions "
                "already; in_flight is for single-turn runs: set rollout.update=between_calls")
        require(r.update != "in_flight" or r.engine != "sglang" or r.sglang.update != "distributed", "rollout.update",
                "with rollout.sglang.update=distributed the trainer installs versions on the servers itself, so a "
                "rollout cannot resume what an update cut: set rollout.sglang.update=disk (or tensor), or "
                "rollout.update=between_calls")
        require(r.update != "in_flight" or r.engine != "sglang" or not a.lora.enabled, "rollout.update",
                "sglang takes LoRA adapters between calls only (a request names its adapter): set "
                "rollout.update=between_calls")
        require(not d.filter_groups or self.flow.staleness is not None, "data.filter_groups",
                "replacements are scheduled for the step that dropped a group, and a step takes only its own "
                "groups under a staleness bound: set flow.staleness (e.g. 1) or data.filter_groups=false")
        require(not d.sources or not self.eval.every or self.reward.fn is not None, "reward.fn",
                "periodic evaluation of a mixture scores eval.data with reward.fn: set it (the sources keep their own)")
        for i, s in enumerate(d.sources):
            require(s.path is None or s.reward is not None or self.reward.fn is not None, f"data.sources[{i}].reward",
                    f"the source {s.name!r} reads {s.path!r}, so it needs a reward: set its reward "
                    f"(my_pkg.my_reward) or reward.fn")
        require(not d.sources or not self.env.enabled, "data.sources",
                "a mixture of sources is for single-turn prompts; episodes (env.cls) take data.path or data.task")
        require(not d.sources or not self.eval.every or self.eval.data is not None, "eval.data",
                "periodic evaluation of a mixture needs held-out data: set eval.data=FILE (and reward.fn for it)")
        require(d.path is None or self.reward.fn is not None or self.env.enabled, "reward.fn",
                "a dataset from data.path needs a reward: reward.fn=my_pkg.my_reward (or "
                "rlflow.tasks.rewards.math_answer, rlflow.tasks.rewards.exact_match)")

        require(self.model.path is not None or not d.chat_template, "model.path",
                "data.chat_template=true needs a checkpoint whose tokenizer has a chat template, and the tiny "
                "model built here has none: give model.path=CHECKPOINT_DIR (or set data.chat_template=false)")

    def _check_on_ray(self) -> None:
        """launcher=ray: Ray is installed, and a role on a GPU asks Ray for one."""
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("launcher: launcher=ray needs Ray installed: pip install 'rlflow[ray]' "
                              "(or run with launcher=local)") from None
        require(not self.ray.env.actors or self.env.enabled, "ray.env.actors",
                "environment workers as Ray actors need an environment: set env.cls or env.agent (or "
                "ray.env.actors=false)")
        for role in ("actor", "rollout", "reference") if self.actor.kl_coef > 0 else ("actor", "rollout"):
            device = getattr(self, role).device
            require(not device.startswith("cuda") or getattr(self.ray, role).gpus > 0, f"ray.{role}.gpus",
                    f"{role}.device={device!r} but ray.{role}.gpus=0: Ray hides every GPU from an actor that asks "
                    f"for none; set ray.{role}.gpus=1 (or {role}.device=cpu)")


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlflow_schema", node=RunConfig)


def check_recipe(name: str) -> None:
    """Refuse a ``-cn`` that names no shipped recipe, listing those there are."""
    from rlflow import recipes

    if name not in recipes.names():
        raise ConfigError(f"-cn {name}: no such recipe; the recipes are {', '.join(recipes.names())} (recipes/*.yaml; "
                          f"-cd DIR -cn NAME takes your own DIR/NAME.yaml)")


class StartError(RuntimeError):
    """The run could not place or start its parts (e.g. no Ray node meets a request); the message says which."""
