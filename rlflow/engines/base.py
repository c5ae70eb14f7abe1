"""The engine interfaces: what generates (a rollout engine) and what trains (a train engine).

To plug your own, write a class with this shape and name it by dotted path in the recipe:

    rollout.engine=my_pkg.engines.MyEngine    # class: MyEngine(model_path: str, cfg: RolloutConfig)
                                               # (with actor.lora: MyEngine(model_path, cfg, lora: LoraConfig))
    actor.engine=my_pkg.engines.MyTrainer      # class: MyTrainer(model_path: str, cfg: ActorConfig,
                                               #                  sampling: SamplingParams)  (the rollout's)

``examples/custom_engine.py`` is a runnable example; the built-in engines are ``engines/hf.py`` and
``engines/sglang.py``. Engines know nothing of the bus: the role loops (``roles/``) move data, engines
compute. An engine that starts something which would outlive its process (a server, files in /dev/shm)
registers its cleanup with ``rlflow.transfer.lifetime.at_exit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: configs import SamplingParams without torch
    import torch


@dataclass
class Generation:
    """One sampled response."""

    response_ids: list[int]  # [T] token ids, the stop token included when it was produced
    logprobs: list[float]  # [T] log μ(y_t) under the sampling distribution (temperature applied, before top-p)
    finish_reason: str  # "stop" | "length"
    version: int | None = None  # the policy version that generated it, when the engine knows (else the role's)
    token_versions: list[int] | None = None  # [T] the version of each token (rollout.update=in_flight)


@dataclass
class Sequence:
    """A sequence an engine generates in steps (continuous decoding, resumed requests): what it has sampled
    so far, each token with its logprob and the policy version it came from."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the version of the logits each token was sampled from
    finish: str | None = None  # "stop" | "length" once it ended
    handed: bool = False  # given to ``finished``: nothing of it is kept once its row leaves the batch

    def add(self, token: int, logprob: float, version: int) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.versions.append(version)

    def generation(self) -> Generation:
        return Generation(self.tokens, self.logprobs, self.finish or "length",
                          version=self.versions[0] if self.versions else None, token_versions=self.versions)


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut


class RolloutEngine(Protocol):
    """Generates with the current policy; swaps in new weights between generate calls."""

    version: int  # the policy version the engine runs now

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        """One response per prompt, in order (repeat a prompt G times for a group)."""

    # For rollout.update=in_flight (continuous generation, roles/in_flight.py) ``generate`` also takes
    #   between: Callable[[int], list[list[int]] | None]: called between decode steps (never inside one)
    #     with the number of sequences still running or waiting in the engine. It may apply a new version
    #     (``load_weights`` or in-place patches, and ``version`` set): tokens sampled after that carry it
    #     in ``Generation.token_versions`` (one per token), their logprobs the new policy's
    #     (``rollout.kv_after_update``). It may return more prompts, to generate in the same call,
    #     numbered after those before them.
    #   finished: Callable[[int, Generation], None] | None: called with (index, generation) as each
    #     sequence ends, so its group is put without waiting for the longest (an engine that ignores it
    #     gets every generation handed over when the call returns).
    # The call returns, in order, every generation, once nothing runs and ``between`` gives no more.
    # Without the keyword, in_flight is refused, naming this.

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy weights by ``weights`` (parameter name -> tensor) and set ``version``. With
        LoRA (``actor.lora``) the weights are the adapters alone, named as peft names them in a model
        wrapped by ``engines/lora.wrap``; the base model stays as loaded."""

    # Optional: ``tensors() -> dict[str, torch.Tensor]``, the engine's live weights (contiguous, in the
    # sync dtype, names as the trainer's ``weights()``). With it, patches are scattered into them in
    # place and ``load_weights`` is not called; without it, the rollout keeps a host copy, patches that,
    # and calls ``load_weights`` with the whole of it. A subclass of an engine that has ``tensors()``
    # (``HFRolloutEngine``) which overrides ``load_weights`` gets its override called for every version
    # (``sync/weights.patches_in_place``); to keep the in-place path, override ``tensors()`` too.


class TrainEngine(Protocol):
    """Owns the trained model and its optimizer; the actor loop owns the algorithm (``algo/loss.py``).

    Built as ``cls(model_path, cfg, sampling)``: ``cfg`` the ActorConfig, ``sampling`` the rollout's
    SamplingParams; logprobs are those of softmax(logits / sampling.temperature), as the rollout's are."""

    version: int  # optimizer steps taken since the start policy (version 0)

    def token_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """[B, T] log π_θ(y_t) of each response token, differentiable, zero-padded to the longest response."""

    def step(self, grad_scale: float, lr_scale: float = 1.0) -> dict[str, float]:
        """Multiply accumulated gradients by ``grad_scale``, step the optimizer at its learning rate times
        ``lr_scale`` (VCPO's factor, for this step only: restore the rate after), zero grads, version += 1.
        Returns metrics, e.g. ``actor/grad_norm`` and ``lr/effective``. For actor.minibatches or
        actor.epochs > 1 it also takes ``advance: bool``: False steps the optimizer without version += 1."""

    # Optional, for actor.replicas > 1 (data-parallel trainers):
    # def gradients(self) -> list[Tensor]:
    #     """Every trainable parameter's accumulated gradient (zeros where none flowed), summed in place."""

    # For actor.parallel=fsdp (a sharded trainer, like HFTrainEngine with engines/fsdp.py): ``sharded = True``;
    # built after the ranks' process group; ``token_logprobs``, ``step``, ``weights`` (whole on rank 0,
    # empty elsewhere), ``snapshot`` and ``restore`` are collectives every rank calls; and
    # def gathered_views(self) -> Iterable[tuple[str, Tensor]]:
    #     """(name, whole parameter) in name order, gathered on every rank (the end-of-run identity check)."""
    # def shard_weights(self) -> tuple[dict[str, Tensor], dict[str, list[int]], dict[str, list[int]]]:
    #     """(this rank's rows of each parameter, their [start, stop) on dim 0, each whole shape): what the
    #     rank publishes itself (sharded SparseRL-Sync; engines/fsdp.local_rows)."""

    # Optional, for actor.advantage=opob:
    # def trajectory_grad_sq(self, prompts, responses) -> tuple[Tensor, Tensor]:
    #     """([B] squared norm of each response's ∇_θ log π_θ, [B] its log π_θ), leaving .grad untouched."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy parameters as rollout engines load them (name -> tensor, no duplicates of tied ones;
        with LoRA the adapters alone). An engine that trains adapters sets ``lora = True``."""

    def save(self, path: str) -> None:
        """Write a checkpoint that ``from_pretrained(path)`` (or the engine's own loader) reads back."""

    # For actor.lora (adapters on a frozen base, like HFTrainEngine with engines/lora.py): ``lora = True``;
    # ``weights`` returns the adapters alone, by the names a rollout engine's model wrapped the same way
    # has; a checkpoint of it holds ``adapter/`` (peft's files), and on resume the engine is built from the
    # start model, not the checkpoint, and ``restore`` loads the adapters.

    # Optional, for checkpoints a run can resume from (``train/checkpoint.py``; without them only the
    # final model is saved, and a failed trainer stops the run):
    # def snapshot(self) -> Callable[[str], None]:
    #     """Copy what a resume needs (weights, optimizer state) now; return a writer ``write(dir)`` that
    #     another thread calls later, while training goes on (so it must not read live state)."""
    # def restore(self, path: str, version: int) -> None:
    #     """Continue from a checkpoint ``snapshot`` wrote: the engine was built from ``path`` (its weights);
    #     load the rest (optimizer state) and set ``version``."""
