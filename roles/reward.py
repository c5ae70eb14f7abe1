"""The reward role: responses in, one scalar reward per sample out.

Loop contract:
- consumes: rows with ``response_ids`` and ``fields`` (any rows, not whole groups: scoring is per sample)
- produces: ``reward`` (float32; NaN when the reward function raised)
- waits for: responses (idle is normal)
- unblocked by: the rollouts' puts

The reward function is user code and runs at a fault boundary: an exception becomes a NaN reward, a
``reward_error`` report naming the row (uid, prompt, response, the exception) and a count in the
metrics; the run goes on and the actor skips that sample. Anything else that fails (the bus, a bad
``reward.fn`` path at start-up) fails the role, and the launcher stops the run with its traceback.

Time limit: with ``timeout_s`` > 0 the function runs in a sandbox process (``roles/sandbox.py``); a
call past the limit is killed and its sample scores NaN with a ``reward_error`` saying so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from roles import schema
from roles.interfaces import RoleContext, ack_work, at_role_exit, load_object, next_rows
from roles.sandbox import Sandbox, call


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


def serve(cfg: RewardConfig, ctx: RoleContext) -> None:
    from transformers import AutoTokenizer

    assert cfg.fn is not None, "the launcher resolves reward.fn=null to the task's own reward"
    fn = load_object(cfg.fn, "reward.fn")  # imported here too, so a bad path fails at start with its field
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_path)
    sandbox = Sandbox(cfg.fn, cfg.timeout_s) if cfg.timeout_s > 0 else None
    at_role_exit(lambda: sandbox and sandbox.close())
    ctx.report("ready")
    while True:
        d = next_rows(ctx, "reward", schema.REWARD_INPUT, cfg.batch)
        if d is None:
            continue
        t0 = time.monotonic()
        with ctx.timeline.span("score", samples=len(d)):
            texts = tokenizer.batch_decode(d.table.column("response_ids").to_pylist(), skip_special_tokens=True)
            fields = [json.loads(f) for f in d.table.column("fields").to_pylist()]
            if sandbox is None:
                rewards = [score(fn, text, f, uid, ctx) for text, f, uid in zip(texts, fields, d.uids)]
            else:
                rewards = [_checked(result, text, f, uid, ctx)
                           for result, text, f, uid in zip(sandbox.score(texts, fields), texts, fields, d.uids)]
        ctx.bus.put({"uid": d.uids, "reward": rewards}, missing="skip")
        ack_work(ctx, d)
        ctx.report("reward", samples=len(rewards), seconds=time.monotonic() - t0,
                   errors=sum(math.isnan(r) for r in rewards))


def score(fn, response: str, fields: dict, uid: str, ctx: RoleContext) -> float:
    """fn(response, **fields) as a float, or NaN with a report when it raises or returns a non-number."""
    return _checked(call(fn, response, fields), response, fields, uid, ctx)


def _checked(result: tuple, response: str, fields: dict, uid: str, ctx: RoleContext) -> float:
    if result[0] == "ok":
        return result[1]
    ctx.report("reward_error", uid=uid, prompt=fields.get("prompt"), response=response, error=result[1],
               traceback=result[2])
    return math.nan
