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
"""

from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass

from roles import schema
from roles.interfaces import RoleContext, ack_work, load_object, next_rows


@dataclass
class RewardConfig:
    """Which function scores a response, and how many to score per call."""

    replicas: int = 1
    """Reward processes."""
    fn: str | None = None
    """Dotted path to fn(response: str, **fields) -> float; null: the built-in task's own reward."""
    batch: int = 512
    """Most samples taken from the bus per call."""


def serve(cfg: RewardConfig, ctx: RoleContext) -> None:
    from transformers import AutoTokenizer

    assert cfg.fn is not None, "the launcher resolves reward.fn=null to the task's own reward"
    fn = load_object(cfg.fn, "reward.fn")
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_path)
    ctx.report("ready")
    while True:
        d = next_rows(ctx, "reward", schema.REWARD_INPUT, cfg.batch)
        if d is None:
            continue
        t0 = time.monotonic()
        texts = tokenizer.batch_decode(d.table.column("response_ids").to_pylist(), skip_special_tokens=True)
        fields = [json.loads(f) for f in d.table.column("fields").to_pylist()]
        rewards = [score(fn, text, f, uid, ctx) for text, f, uid in zip(texts, fields, d.uids)]
        ctx.bus.put({"uid": d.uids, "reward": rewards}, missing="skip")
        ack_work(ctx, d)
        ctx.report("reward", samples=len(rewards), seconds=time.monotonic() - t0,
                   errors=sum(math.isnan(r) for r in rewards))


def score(fn, response: str, fields: dict, uid: str, ctx: RoleContext) -> float:
    """fn(response, **fields) as a float, or NaN with a report when it raises or returns a non-number."""
    try:
        value = float(fn(response, **fields))
        if math.isnan(value):
            raise ValueError("the reward function returned NaN")
        return value
    except Exception as e:  # user code: a fault boundary by design (see the module docstring)
        ctx.report("reward_error", uid=uid, prompt=fields.get("prompt"), response=response,
                   error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=-3))
        return math.nan
