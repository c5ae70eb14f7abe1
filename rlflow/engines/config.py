"""The engines' settings: the sglang server a rollout replica drives, LoRA adapters, and the tiny model built locally.

Torch-free, like every config module (``rlflow/errors.py``): the launcher checks them without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlflow.errors import require, require_counts, require_seconds

DTYPES = ("float32", "bfloat16", "float16")
"""Weights dtypes an engine may run in (``rollout.dtype``, ``reference.dtype``)."""
UPDATES = ("disk", "tensor", "distributed")
"""How new weights reach an sglang server (``rollout.sglang.update``)."""


@dataclass
class SGLangConfig:
    """rollout.engine=sglang: which server each replica drives and how new weights reach it."""

    url: str | None = None
    """A running sglang server (http://host:port); null: each replica launches its own on its GPU(s): under
    launcher=ray the GPUs Ray gave it (ray.rollout.gpus), under the local launcher the visible ones from
    rollout.device (cuda:N starts at GPU N), which replicas would share."""
    host: str = "127.0.0.1"
    """Launched servers: the interface they listen on."""
    port: int = 0
    """Launched servers: the port (0: a free one)."""
    tp_size: int = 1
    """Launched servers: tensor-parallel GPUs per server (give the replica as many: ray.rollout.gpus)."""
    mem_fraction: float | None = None
    """Launched servers: --mem-fraction-static (null: sglang's choice)."""
    launch_args: list[str] = field(default_factory=list)
    """Launched servers: more `python -m sglang.launch_server` arguments, e.g. [--context-length, '4096']."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer key of the server(s): a server at `url` started with --api-key, or the key launched servers
    take (null: each launched server gets a random one; with update=distributed, one per run)."""
    update: str = "disk"
    """How new weights reach the server: disk (a safetensors snapshot in update_dir, read by the server:
    same host or a shared filesystem), tensor (CUDA IPC handles: same host, needs the sglang extra here),
    or distributed (the trainer broadcasts every tensor to every server through one process group:
    NCCL from the trainer's GPU, no patches; `WeightBroadcaster`)."""
    update_dir: str | None = None
    """update=disk: where snapshots are written (null: a directory in /dev/shm, else the temp dir)."""
    bucket_mb: int = 512
    """update=tensor: most MB of tensors per update request (bounds the GPU copy)."""
    startup_timeout: float = 900.0
    """Bound on a server becoming ready (launch, or the first contact with `url`)."""
    request_timeout: float = 1800.0
    """Bound on one HTTP request (a whole batched generate)."""
    flush_timeout: float = 60.0
    """Bound on the cache flush succeeding after an update (the server refuses while not idle)."""
    max_retries: int = 3
    """Times a sequence the server aborted is sent again before the call fails."""

    def check(self, at: str = "rollout.sglang") -> None:
        require(self.url is None or self.url.startswith(("http://", "https://")), f"{at}.url",
                f"must be http://HOST:PORT, got {self.url!r}")
        require(self.update in UPDATES, f"{at}.update", f"choose one of {UPDATES}, got {self.update!r}")
        require_counts(self, at, "tp_size", "bucket_mb")
        require(self.max_retries >= 0, f"{at}.max_retries", f"must be >= 0, got {self.max_retries}")
        require(self.mem_fraction is None or 0 < self.mem_fraction < 1, f"{at}.mem_fraction",
                f"must be in (0, 1) or null (sglang's choice), got {self.mem_fraction}")
        require_seconds(self, at, "startup_timeout", "request_timeout", "flush_timeout")


LORA_FINAL = ("adapter", "merged")
"""What the run's final LoRA checkpoint holds (``actor.lora.final``)."""


@dataclass
class LoraConfig:
    """actor.lora: train low-rank adapters (peft) on a frozen base model instead of the whole model.

    Only the adapters train, sync to the rollouts and go into checkpoints; the rollout engines apply the
    same adapters (hf: peft on the same base; sglang: its LoRA adapter API). The reference role, which
    loads the start model, scores with the base: the KL term is to the model the adapters started from."""

    rank: int = 0
    """r of every adapter (0: off, the whole model trains). Each targeted linear layer W gets W + (alpha / r) B A
    with A [r, in] (random at the start) and B [out, r] (zeros), so version 0 is exactly the base model."""
    alpha: float = 16.0
    """The adapters' scale numerator (scale = alpha / rank)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    """Linear layers that get adapters, by the last part of their module name (peft's matching); the default
    names every projection of Llama/Qwen/Mistral-style decoders."""
    final: str = "adapter"
    """The run's final checkpoint: adapter (peft's adapter files, loaded on the base model) or merged (also
    checkpoints/final/merged: the base with the adapters merged in float32, as from_pretrained files; a
    full-size copy of the model). `rlflow export [--dtype bfloat16]` merges any LoRA checkpoint later."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self, at: str = "actor.lora") -> None:
        require(self.rank >= 0, f"{at}.rank", f"must be >= 0 (0: no adapters, the whole model trains), got {self.rank}")
        if not self.enabled:
            return
        require(self.alpha > 0, f"{at}.alpha", f"must be > 0 (the adapters' scale is alpha / rank), got {self.alpha}")
        require(len(self.target_modules) > 0 and all(isinstance(m, str) and m for m in self.target_modules),
                f"{at}.target_modules", f"name at least one linear layer, e.g. [q_proj, v_proj], got {self.target_modules}")
        require(self.final in LORA_FINAL, f"{at}.final", f"choose one of {LORA_FINAL}, got {self.final!r}")
        import importlib.util

        require(importlib.util.find_spec("peft") is not None, f"{at}.rank",
                f"{at}.rank={self.rank} trains adapters with peft, which is not installed: pip install "
                f"'rlflow[lora]' (or set {at}.rank=0 to train the whole model)")


@dataclass
class TinyModelConfig:
    """Shape and warm-start of the locally built model (used when ``model.path`` is not given)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the MLP."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (head_dim = hidden_size / num_heads)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    max_positions: int = 128
    """Longest prompt + response the model is built for."""
    warmup_steps: int = 30
    """Supervised steps on the task's demonstrations before RL (0: pure random init)."""
    warmup_lr: float = 1e-3
    """AdamW learning rate of the warm-start."""
    warmup_batch: int = 64
    """Demonstrations per warm-start step."""
    seed: int = 0
    """Seed of the initial weights and of the demonstrations."""
    answer_key: str = "answer"
    """With data.path: the column whose text the warm-start teaches as the answer to each prompt (a data
    file without it gets no warm-start)."""

    def check(self, at: str = "model.tiny") -> None:
        require_counts(self, at, "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                       "max_positions", "warmup_batch")
        require(self.hidden_size % self.num_heads == 0, f"{at}.num_heads",
                f"must divide hidden_size ({self.hidden_size}) into whole heads, got {self.num_heads}")
        require(self.num_heads % self.num_kv_heads == 0, f"{at}.num_kv_heads",
                f"must divide num_heads ({self.num_heads}): each key/value head serves a whole group of "
                f"attention heads, got {self.num_kv_heads}")
        require(self.warmup_steps >= 0, f"{at}.warmup_steps", f"must be >= 0 (0: no warm-start), got {self.warmup_steps}")
        require(self.warmup_lr > 0, f"{at}.warmup_lr", f"must be > 0, got {self.warmup_lr}")
