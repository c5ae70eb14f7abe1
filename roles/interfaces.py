"""The plug-in interfaces: a rollout engine, a train engine, a reward function — and what a role is given.

To plug your own, write a class or function with this shape and name it by dotted path in the recipe:

    rollout.engine=my_pkg.engines.MyEngine    # class: MyEngine(model_path: str, cfg: RolloutConfig)
    actor.engine=my_pkg.engines.MyTrainer      # class: MyTrainer(model_path: str, cfg: ActorConfig)
    reward.fn=my_pkg.rewards.my_reward         # function: my_reward(response: str, **fields) -> float

``examples/custom_reward.py`` and ``examples/custom_engine.py`` are runnable examples. The built-in
engines are in ``roles/hf.py``. Engines know nothing of the bus: the role loops move data, engines compute.
"""

from __future__ import annotations

import importlib
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch


@dataclass
class Generation:
    """One sampled response."""

    response_ids: list[int]  # [T] token ids, the stop token included when it was produced
    logprobs: list[float]  # [T] log μ(y_t) under the sampling distribution (temperature applied, before top-p)
    finish_reason: str  # "stop" | "length"
    version: int | None = None  # the policy version that generated it, when the engine knows (else the role's)


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

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """Replace the policy weights by ``weights`` (parameter name -> tensor) and set ``version``."""

    # Optional: ``tensors() -> dict[str, torch.Tensor]``, the engine's live weights (contiguous, in the
    # sync dtype, names as the trainer's ``weights()``). With it, patches are scattered into them in
    # place and ``load_weights`` is not called; without it, the rollout keeps a host copy, patches that,
    # and calls ``load_weights`` with the whole of it. A subclass of an engine that has ``tensors()``
    # (``HFRolloutEngine``) which overrides ``load_weights`` gets its override called for every version
    # (``roles/weights.patches_in_place``); to keep the in-place path, override ``tensors()`` too.


class TrainEngine(Protocol):
    """Owns the trained model and its optimizer; the actor loop owns the algorithm (``roles/loss.py``)."""

    version: int  # optimizer steps taken since the start policy (version 0)

    def token_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """[B, T] log π_θ(y_t) of each response token, differentiable, zero-padded to the longest response."""

    def step(self, grad_scale: float, lr_scale: float = 1.0) -> dict[str, float]:
        """Multiply accumulated gradients by ``grad_scale``, step the optimizer at its learning rate times
        ``lr_scale`` (VCPO's factor, for this step only: restore the rate after), zero grads, version += 1.
        Returns metrics, e.g. ``actor/grad_norm`` and ``lr/effective``."""

    # Optional, for actor.replicas > 1 (data-parallel trainers):
    # def gradients(self) -> list[Tensor]:
    #     """Every trainable parameter's accumulated gradient (zeros where none flowed), summed in place."""

    # Optional, for actor.advantage=opob:
    # def trajectory_grad_sq(self, prompts, responses) -> tuple[Tensor, Tensor]:
    #     """([B] squared norm of each response's ∇_θ log π_θ, [B] its log π_θ), leaving .grad untouched."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy parameters as rollout engines load them (name -> tensor, no duplicates of tied ones)."""

    def save(self, path: str) -> None:
        """Write a checkpoint that ``from_pretrained(path)`` (or the engine's own loader) reads back."""

    # Optional, for checkpoints a run can resume from (``roles/checkpoint.py``; without them only the
    # final model is saved, and a failed trainer stops the run):
    # def snapshot(self) -> Callable[[str], None]:
    #     """Copy what a resume needs (weights, optimizer state) now; return a writer ``write(dir)`` that
    #     another thread calls later, while training goes on (so it must not read live state)."""
    # def restore(self, path: str, version: int) -> None:
    #     """Continue from a checkpoint ``snapshot`` wrote: the engine was built from ``path`` (its weights);
    #     load the rest (optimizer state) and set ``version``."""


RewardFn = Callable[..., float]  # fn(response: str, **fields) -> float; fields are the prompt record's


class Endpoints(Protocol):
    """Where a role listens and how it finds others' sockets (the launcher's concern: ``flow/endpoints.py``)."""

    def bind_address(self, name: str) -> str:
        """The address to bind endpoint ``name`` at (it may carry port 0: the OS picks)."""

    def advertise(self, name: str, address: str) -> None:
        """Publish the address ``name`` was actually bound at."""

    def lookup(self, name: str, timeout: float) -> str:
        """The address of endpoint ``name``, waiting up to ``timeout`` for it to be advertised."""


class Timeline:
    """What a replica spends its time on, as spans for the run's trace (``rlflow report``: trace.json).

    A role loop records a span per activity: ``generate``, ``score``, ``train``, ``sync`` (weights),
    ``checkpoint``, ``wait`` (for rows, groups or weights). Spans are taken out by whoever hosts the
    role (``flow/worker.py`` sends them with each heartbeat) and cost the loop an append. The buffer is
    bounded: if nobody takes spans out (the launcher stopped reading), the oldest are dropped and
    counted, so a stuck reader never grows a role's memory.
    """

    MAX_SPANS = 20_000  # about 5 MB; at a few spans per step, minutes of a run

    def __init__(self) -> None:
        self._spans: deque[dict] = deque(maxlen=self.MAX_SPANS)
        self._open: list[tuple[str, float, dict]] = []  # spans entered and not yet left (innermost last)
        self.dropped = 0

    @contextmanager
    def span(self, name: str, **args) -> Iterator[dict]:
        """Record the ``with`` block as span ``name``; the yielded ``args`` may be filled in inside it."""
        entry = (name, time.time(), args)
        self._open.append(entry)
        try:
            yield args
        finally:
            self._open.remove(entry)
            self.add(name, entry[1], time.time() - entry[1], **args)

    def add(self, name: str, start: float, seconds: float, **args) -> None:
        """A span that started at ``start`` (time.time()) and lasted ``seconds``."""
        if len(self._spans) == self.MAX_SPANS:
            self.dropped += 1
        self._spans.append({"name": name, "t": round(start, 6), "d": round(seconds, 6), "args": args})

    def take(self, last: bool = False) -> list[dict]:
        """Every span recorded so far, oldest first, and forget them (safe against a concurrent ``add``).

        ``last``: the process is stopping; spans still open (an idle wait, typically) end now, marked unfinished.
        """
        out = []
        while self._spans:
            out.append(self._spans.popleft())
        if last:
            now = time.time()
            out += [{"name": name, "t": round(t0, 6), "d": round(now - t0, 6), "args": {**args, "unfinished": True}}
                    for name, t0, args in list(self._open)]
        return out


@dataclass
class RoleContext:
    """Everything a role loop gets from whoever launched it; roles know nothing more of launching."""

    bus: Any  # transfer.BusClient
    endpoints: Endpoints  # names -> addresses: "weights" (the actor's channel), "weights-<i>" (relays)
    keys_dir: str | None  # CURVE keys for sockets beyond loopback (transfer/security.py); None on one host
    model_path: str  # checkpoint every role starts from (version 0)
    report: Callable[..., None]  # report(kind, **data): metrics, warnings, errors to the launcher
    run_dir: str
    replica: int  # this replica's index among the role's replicas
    seed: int
    wait_seconds: float  # bound on any wait for data or weights that should arrive
    lease_seconds: float  # lease on rows taken from the bus
    timeline: Timeline = field(default_factory=Timeline)  # spans of this replica's activities, for the trace


_EXIT_HOOKS: list[Callable[[], None]] = []


def at_role_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when this role process stops, however it stops (its loop ends, it fails, or the launcher
    stops it): for what would outlive it, such as a server it launched or files in /dev/shm."""
    _EXIT_HOOKS.append(fn)


def run_exit_hooks() -> None:
    """Run the hooks of ``at_role_exit`` once, newest first; one failing does not stop the others."""
    while _EXIT_HOOKS:
        try:
            _EXIT_HOOKS.pop()()
        except Exception:  # noqa: BLE001 - a cleanup must not prevent the next one
            pass


IDLE_WAIT_S = 30.0  # one idle get's bound; a role loop then re-checks its own state and waits again


def next_rows(ctx: RoleContext, consumer: str, columns: list[str], n: int, groups: bool = False):
    """The next delivery of up to ``n`` ready rows (or groups) for a role that may idle for a long time.

    Idling is normal for rollout, reward and reference (with staleness 0 they wait while the actor
    trains), so an idle bound passing is not an error; the run's progress is bounded by the actor's wait.
    Returns None after an idle bound so the caller can do between-deliveries work (load weights).
    """
    from transfer import BusTimeout

    with ctx.timeline.span("wait", rows=0) as span:
        try:
            d = ctx.bus.get(consumer, columns, n=n, min_n=1, groups=groups, timeout=IDLE_WAIT_S,
                            lease=ctx.lease_seconds)
        except BusTimeout:
            return None
        span["rows"] = len(d)
    return d


def ack_work(ctx: RoleContext, delivery) -> None:
    """Ack a delivery whose results were put (rollout, reward, reference: at-least-once work).

    A lease that ran out meanwhile is not an error: its rows went back to the bus and another replica
    redoes them; the bus keeps whichever result came first. The launcher counts it.
    """
    from transfer import LeaseExpired

    try:
        ctx.bus.ack(delivery)
    except LeaseExpired:
        ctx.report("lease_expired", rows=len(delivery))


def load_object(path: str, what: str) -> Any:
    """Import ``pkg.module.name``; a bad path is a ValueError naming the recipe field ``what``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{what}={path!r} is not a dotted path like my_pkg.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what}={path!r}: cannot import module {module_name!r} ({e}); "
                         f"is it installed or on PYTHONPATH?") from e
    if not hasattr(module, attr):
        raise ValueError(f"{what}={path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)
