"""What each role is given: the settings a user writes (``<Role>Config``, with its ``check``) and the
arguments the run derives for it (``<Role>Args``: ``flow/launcher.plan_roles`` fills them in).

One fact lives in one field: the trainer and the reference score logprobs at the rollout's sampling
temperature and the trainer's ``aggregation=constant`` divides by its ``max_new_tokens``, so they read
``rollout.temperature`` and ``rollout.max_new_tokens`` (through their Args) and have no copy of either.

Torch-free, like every config module (``rlflow/errors.py``): the launcher checks a run and plans its
replicas without importing torch. Each role's loop (``roles/<role>.py``) imports its own config from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlflow.algo.choices import (ADVANTAGES, AGGREGATIONS, CORRECTIONS, LEVELS, LR_RULES, OLD_LOGPROBS,
                                 RATIO_LEVELS)
from rlflow.engines.base import SamplingParams
from rlflow.engines.config import DTYPES, LoraConfig, SGLangConfig
from rlflow.envs.config import EnvConfig
from rlflow.errors import require, require_counts
from rlflow.sync.config import SyncConfig

PARALLEL = ("replicate", "fsdp")  # actor.parallel: how the trainer ranks hold the model
UPDATES = ("between_calls", "in_flight")  # rollout.update: when a rollout takes a new policy version
KV_AFTER_UPDATE = ("recompute", "keep")  # rollout.kv_after_update: what becomes of the KV cache then

# ---------------------------------------------------------------------------- rollout
@dataclass
class RolloutConfig:
    """Generation: how many samples, how long, with which engine, on which device."""

    replicas: int = 1
    """Rollout processes; each takes whole groups from the bus."""
    engine: str = "hf"
    """'hf' (torch + transformers, CPU or GPU), 'sglang' (an sglang server per replica; see `sglang`) or a
    dotted path to a RolloutEngine class."""
    group_size: int = 8
    """G: samples per prompt (one group)."""
    max_new_tokens: int = 8
    """Longest response in tokens; longer ones end with finish_reason 'length'."""
    temperature: float = 1.0
    """Sampling temperature; the actor scores with the same one."""
    top_p: float = 1.0
    """Nucleus cut (1.0: off). Below 1 the recorded logprobs are of the uncut distribution."""
    top_k: int = 0
    """Top-k cut (0: off)."""
    groups_per_call: int = 16
    """Most groups taken from the bus for one generate call (bigger batches, coarser streaming)."""
    max_batch: int = 256
    """Most sequences the engine decodes at once; bounds the KV cache's memory."""
    device: str = "cpu"
    """torch device of the engine."""
    dtype: str = "float32"
    """Weights dtype of the engine: float32 | bfloat16 | float16."""
    threads: int = 1
    """torch intra-op threads per replica (keep replicas x threads within the cores)."""
    seed: int = 0
    """Sampling seed (each replica adds its index)."""
    update: str = "between_calls"
    """When a new policy version is applied: 'between_calls' (a generate call runs at one version) or
    'in_flight' (between decode steps too: a long response's later tokens come from newer weights, and
    each token records its version in token_versions). The staleness bound holds per token either way."""
    kv_after_update: str = "recompute"
    """update=in_flight, what an update does to the KV cache of sequences mid-generation: 'recompute' (one
    forward pass over each sequence so far under the new weights: every logprob is exactly the policy
    of its token's version) or 'keep' (no extra pass; tokens after the update attend to keys and values
    the older weights computed, so their logprobs are those of a mix of versions, recorded as sampled)."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """engine=sglang: the server each replica drives and how weights reach it."""

    def sampling(self) -> SamplingParams:
        """What each generate call samples with (and what the trainer scores at: ``ActorArgs.sampling``)."""
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    def check(self, at: str = "rollout") -> None:
        require(self.group_size >= 2, f"{at}.group_size",
                f"group advantages need >= 2 samples per prompt, got {self.group_size}")
        require_counts(self, at, "replicas", "max_new_tokens", "groups_per_call", "max_batch", "threads")
        require(self.temperature > 0, f"{at}.temperature",
                f"must be > 0 (logprobs of a greedy policy are degenerate), got {self.temperature}")
        require(0 < self.top_p <= 1, f"{at}.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"{at}.top_k", f"must be >= 0 (0: off), got {self.top_k}")
        require(self.dtype in DTYPES, f"{at}.dtype", f"choose one of {DTYPES}, got {self.dtype!r}")
        require(self.update in UPDATES, f"{at}.update", f"choose one of {UPDATES}, got {self.update!r}")
        require(self.kv_after_update in KV_AFTER_UPDATE, f"{at}.kv_after_update",
                f"choose one of {KV_AFTER_UPDATE}, got {self.kv_after_update!r}")
        if self.engine != "sglang":
            return
        self.sglang.check(f"{at}.sglang")
        require(self.sglang.url is not None or self.device.startswith("cuda"), f"{at}.sglang.url",
                f"{at}.engine=sglang launches an sglang server per replica, which needs a GPU: set "
                f"{at}.device=cuda on a GPU host, or give the URL of a running server ({at}.device={self.device!r})")
        require(self.sglang.url is None or self.replicas == 1, f"{at}.sglang.url",
                f"{self.replicas} replicas would share one server and update each other's weights: give each "
                f"replica its own server (leave url null) or use {at}.replicas=1")


@dataclass(frozen=True)
class RolloutArgs:
    """What the run tells a rollout replica beyond its own config (``flow/launcher.plan_roles``)."""

    sync: SyncConfig  # resolved: ``sync.dtype`` is the rollout's
    upstream: str | None = None  # the endpoint this replica pulls weight chunks from (None: the actor)
    relay: str | None = None  # the endpoint it serves peers at (None: no peer pulls from it)
    env: EnvConfig | None = None  # the environment of multi-turn episodes (None or cls null: single-turn)
    chat_template: bool = False  # data.chat_template: prompts, and so an episode's observations, are rendered with it
    weight_shards: int = 1  # channels the weights come on: one per trainer rank when each publishes its own rows
    lora: LoraConfig | None = None  # actor.lora when enabled: the engine wraps its model with the same adapters,
    # and the weights that come are the adapters only


@dataclass(frozen=True)
class RewardArgs:
    """What the run tells a reward replica beyond its own config."""

    episodes: bool = False  # rows are episodes (env.cls): score the last turn, pass env_reward to the function
    sources: dict[str, str] | None = None  # data.sources: each source's reward function, by the record's data_source


# ---------------------------------------------------------------------------- reward
@dataclass
class RewardConfig:
    """Which function scores a response, and how many to score per call."""

    replicas: int = 1
    """Reward processes."""
    fn: str | None = None
    """Dotted path to fn(response: str, **fields) -> float; null: the built-in task's own reward."""
    batch: int = 512
    """Most samples taken from the bus per call."""
    timeout_s: float = 30.0
    """Most seconds one call of `fn` may take; past it the call is killed and the sample scores NaN.
    The function then runs in a sandbox process of its own (0: no limit, in the role's process)."""
    max_failed_steps: int = 3
    """Stop the run, naming the function and what it did, once it failed on every sample of this many
    steps in a row (0: never): such steps train nothing."""

    def check(self, at: str = "reward") -> None:
        require_counts(self, at, "replicas", "batch")
        require(self.timeout_s >= 0, f"{at}.timeout_s", f"must be >= 0 seconds (0: no limit), got {self.timeout_s}")
        require(self.max_failed_steps >= 0, f"{at}.max_failed_steps",
                f"must be >= 0 (0: never stop for failing rewards), got {self.max_failed_steps}")
        require(self.fn is None or "." in self.fn, f"{at}.fn",
                f"must be a dotted path like my_pkg.module.my_reward, got {self.fn!r}")


# ---------------------------------------------------------------------------- reference
@dataclass
class ReferenceConfig:
    """Where and how the reference model runs (the role exists only when actor.kl_coef > 0)."""

    replicas: int = 1
    """Reference processes."""
    batch: int = 256
    """Most samples scored per forward pass."""
    device: str = "cpu"
    """torch device."""
    dtype: str = "float32"
    """Weights dtype: float32 | bfloat16 | float16."""
    threads: int = 1
    """torch intra-op threads per replica."""

    def check(self, at: str = "reference") -> None:
        require_counts(self, at, "replicas", "batch", "threads")
        require(self.dtype in DTYPES, f"{at}.dtype", f"choose one of {DTYPES}, got {self.dtype!r}")


@dataclass(frozen=True)
class ReferenceArgs:
    """What the run tells a reference replica beyond its own config."""

    temperature: float  # the rollout's sampling temperature: logprobs are taken under the same distribution
    episodes: bool = False  # rows are multi-turn episodes (env.cls): responses may hold several segments


# ---------------------------------------------------------------------------- actor
@dataclass
class ActorConfig:
    """The algorithm and the optimizer."""

    engine: str = "hf"
    """'hf' (torch + transformers) or a dotted path to a TrainEngine class."""
    replicas: int = 1
    """Trainer processes (ranks): each trains on groups_per_step / replicas groups, gradients are summed."""
    parallel: str = "replicate"
    """How the ranks hold the model: replicate (each a whole copy, gradients all-reduced: data parallel) or
    fsdp (PyTorch FSDP2: parameters, gradients and AdamW state sharded per decoder layer, ~1/replicas each;
    a step's passes run once its groups are in, not as they arrive; engines/fsdp.py)."""
    param_dtype: str = "float32"
    """fsdp: dtype layers compute in (bfloat16 on GPU); gradients reduce and master weights stay in float32."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (memory of one layer's activations, ~1/3 more compute)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (peft): only they train, sync and checkpoint (rank 0: off; engines/lora.py)."""
    groups_per_step: int = 16
    """Prompt groups per optimizer step (batch = groups_per_step x rollout.group_size samples)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    advantage: str = "grpo"
    """grpo | rloo | drgrpo | opob (VCPO's off-policy optimal baseline: one extra backward per sample)."""
    aggregation: str = "token_mean"
    """token_mean (DAPO) | seq_mean | constant (Dr.GRPO: samples x rollout.max_new_tokens)."""
    clip_low: float = 0.2
    """PPO clip: r >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip: r <= 1 + clip_high (DAPO clip-higher when above clip_low)."""
    old_logprobs: str = "rollout"
    """rollout: ratio against the rollout's logprobs (the clip is the only off-policy control);
    recompute: proximal ratio plus the importance weight chosen by ``correction`` (AReaL's decoupled PPO)."""
    ratio_level: str = "token"
    """token: PPO's per-token ratio; sequence: GSPO's exp(mean_t log ratio) (use clip_low/high ~ 3e-4/4e-4)."""
    correction: str = "none"
    """Importance weight of old_logprobs=recompute: tis (truncate at is_cap), mis (mask outside
    [1/is_cap, is_cap]) or none (untruncated); must stay none with old_logprobs=rollout."""
    correction_level: str = "token"
    """token: each token's own π/μ; sequence: the product over the response, shared by its tokens."""
    is_cap: float = 2.0
    """C of the truncation or mask (about 2 per token, 8 per sequence)."""
    vcpo: bool = False
    """Scale each step's learning rate by the ESS of the batch's sequence importance weights (VCPO)."""
    vcpo_rule: str = "sqrt"
    """lr x sqrt(min(1, ρ/ρ_ref)) (sqrt) or lr x min(1, ρ/ρ_ref) (linear), ρ = ESS / samples."""
    vcpo_ref: float = 1.0
    """ρ_ref: the ESS ratio at and above which the full learning rate applies."""
    kl_coef: float = 0.0
    """β of the k3 KL to the reference; > 0 starts the reference role."""
    drop_uniform_groups: bool = False
    """Skip groups whose rewards are all equal (no signal) instead of counting them in the normaliser."""
    micro_batch: int = 128
    """Most samples per forward/backward pass (bounds activation memory)."""
    max_tokens_per_microbatch: int | None = None
    """Most tokens per forward/backward pass, padding included: samples are sorted by length and packed
    under this budget (memory bounded by tokens, not by the longest sample x micro_batch); a sample longer
    than it gets a pass of its own. null: micro_batch alone. The step's gradient is the same either way."""
    padding_free: bool = False
    """Each pass is one packed row: its samples end to end, positions restarting at each, no padding
    (transformers' packed sequences: a varlen kernel with attn_implementation=flash_attention_2 on GPU, a
    block-causal mask otherwise, which on CPU is slower than sorted padded passes: docs/benchmarks.md).
    Same gradient; max_tokens_per_microbatch then counts real tokens. The trainer checks at start that its
    model keeps packed samples apart, and refuses to start if not."""
    attn_implementation: str | None = None
    """The trained model's attention kernel (transformers' attn_implementation: sdpa, eager,
    flash_attention_2 with the flash-attn package on GPU, ...); null: transformers' default."""
    minibatches: int = 1
    """Optimizer steps per epoch: each version's groups (every rank's, sorted, shuffled after the first
    epoch) cut into this many minibatches of whole groups, one AdamW step each; the version moves on
    after the last."""
    epochs: int = 1
    """Passes over each version's groups (PPO epochs; the order is shuffled after the first). With more than
    one optimizer step per version the ratio moves away from 1 and the clip acts; old_logprobs=recompute
    then scores the proximal policy once per version."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N steps (0: only the final one); written in the background."""
    checkpoint_keep: int = 2
    """Newest step-N checkpoints kept (older ones are deleted; `final` is always kept)."""
    device: str = "cpu"
    """torch device of the trained model."""
    threads: int = 1
    """torch intra-op threads."""
    seed: int = 0
    """torch seed."""

    def check(self, at: str = "actor") -> None:
        require_counts(self, at, "replicas", "groups_per_step", "micro_batch", "threads", "checkpoint_keep",
                       "minibatches", "epochs")
        self.lora.check(f"{at}.lora")
        require(self.max_tokens_per_microbatch is None or self.max_tokens_per_microbatch > 0,
                f"{at}.max_tokens_per_microbatch", f"must be > 0 tokens, or null (micro_batch alone), got "
                f"{self.max_tokens_per_microbatch}")
        require(self.groups_per_step % self.replicas == 0, f"{at}.replicas",
                f"each trainer replica takes groups_per_step / replicas groups: {self.groups_per_step} groups do "
                f"not split over {self.replicas} replicas; make {at}.groups_per_step a multiple of {at}.replicas")
        require(self.parallel in PARALLEL, f"{at}.parallel", f"choose one of {PARALLEL}, got {self.parallel!r}")
        require(self.param_dtype in DTYPES, f"{at}.param_dtype",
                f"choose one of {DTYPES}, got {self.param_dtype!r}")
        require(self.param_dtype == "float32" or self.parallel == "fsdp", f"{at}.param_dtype",
                f"{self.param_dtype} compute is FSDP's mixed precision: set {at}.parallel=fsdp, or keep float32")
        require(self.advantage != "opob" or self.parallel != "fsdp", f"{at}.advantage",
                f"opob takes one gradient per trajectory, which a sharded trainer does not compute: use "
                f"{at}.parallel=replicate with opob, or another advantage")
        require(self.attn_implementation is None or (isinstance(self.attn_implementation, str) and self.attn_implementation),
                f"{at}.attn_implementation", f"name a transformers attention kernel (sdpa, eager, flash_attention_2) "
                f"or null, got {self.attn_implementation!r}")
        require(self.minibatches <= self.groups_per_step, f"{at}.minibatches",
                f"a minibatch holds whole groups: {self.groups_per_step} groups per step make at most "
                f"{self.groups_per_step} minibatches, not {self.minibatches}; lower it or raise {at}.groups_per_step")
        for name, names in (("advantage", ADVANTAGES), ("aggregation", AGGREGATIONS), ("old_logprobs", OLD_LOGPROBS),
                            ("ratio_level", RATIO_LEVELS), ("correction", CORRECTIONS), ("correction_level", LEVELS),
                            ("vcpo_rule", LR_RULES)):
            require(getattr(self, name) in names, f"{at}.{name}", f"choose one of {names}, got {getattr(self, name)!r}")
        require(self.correction == "none" or self.old_logprobs == "recompute", f"{at}.correction",
                f"{self.correction!r} weights need {at}.old_logprobs=recompute (with 'rollout' the ratio π/μ is "
                f"already the importance weight): set both, or {at}.correction=none")
        require(self.is_cap > 1, f"{at}.is_cap",
                f"must be > 1 (weights are cut at C, or outside [1/C, C]), got {self.is_cap}")
        require(0 < self.vcpo_ref <= 1, f"{at}.vcpo_ref", f"must be in (0, 1] (an ESS ratio), got {self.vcpo_ref}")
        require(self.lr > 0, f"{at}.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{at}.beta1/beta2",
                f"AdamW needs both in [0, 1), got {self.beta1}, {self.beta2}")
        require(self.weight_decay >= 0, f"{at}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0, f"{at}.max_grad_norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        require(0 <= self.clip_low < 1 and self.clip_high >= 0, f"{at}.clip_low/clip_high",
                f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        require(self.kl_coef >= 0, f"{at}.kl_coef", f"must be >= 0, got {self.kl_coef}")
        require(self.checkpoint_every >= 0, f"{at}.checkpoint_every",
                f"must be >= 0 (0: only the final checkpoint), got {self.checkpoint_every}")


@dataclass(frozen=True)
class Broadcast:
    """sglang rollouts with update=distributed: the trainer installs every version on the servers itself
    (``engines/sglang.WeightBroadcaster``); the weight channel still carries the versions the feeder's
    admission control reads."""

    servers: int  # rollout replicas, one sglang server each (endpoints ``sglang-<i>``)
    tp: int  # tensor-parallel size of each server
    backend: str  # torch.distributed backend of the group: nccl on CUDA, gloo otherwise
    sglang: SGLangConfig  # the rollout's


@dataclass(frozen=True)
class ActorArgs:
    """What the run tells the actor beyond its own config (``flow/launcher.plan_roles``)."""

    steps: int  # optimizer steps of the run (flow.steps)
    staleness: int | None  # flow.staleness: with a bound, take only the groups scheduled for the step
    sync: SyncConfig  # resolved: ``sync.dtype`` is the rollout's (patches are diffed in what the rollout runs)
    sampling: SamplingParams  # the rollout's: logprobs are scored at its temperature, aggregation=constant
    # divides by its max_new_tokens (one fact in one field: the trainer has no copy of either)
    broadcast: Broadcast | None = None
    resume_from: str | None = None  # a checkpoint directory to continue from
    epoch: int = 0  # how many times the run was rewound (recorded in checkpoints)
    samples_every: int = 0  # every that many steps the metrics report carries the step's first group (0: never)
    episodes: bool = False  # rows are multi-turn episodes (env.cls): train only where loss_mask is 1
    in_flight: bool = False  # rollout.update=in_flight: single-turn rows carry token_versions too
    filter_fn: str | None = None  # data.filter_groups: the criterion (data.filter_fn); None: no dynamic sampling
    filter_budget: int = 0  # data.filter_groups: most replacements one replica asks for per step
    sources: list[str] = field(default_factory=list)  # data.sources' names: rows carry data_source, metrics per source
    curriculum: bool = False  # data.curriculum: each step's report carries every group's mean reward
    weight_shards: int = 1  # > 1: every rank publishes its own rows on a channel of its own (sharded sync)
