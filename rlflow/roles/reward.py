"""The reward role: responses in, one scalar reward per sample out.

Loop contract:
- consumes: rows with ``response_ids`` and ``fields`` (any rows, not whole groups: scoring is per sample);
  multi-turn episodes also ``turn_starts``, ``env_reward`` and ``finish_reason``: the function scores the
  last model turn and gets ``env_reward`` with the fields; an episode whose environment failed is not
  scored: its reward is ``env.failure_reward``, or NaN (not trained)
- produces: ``reward`` (float32; NaN when the reward function failed on the sample)
- waits for: responses (idle is normal)
- unblocked by: the rollouts' puts

The reward function is user code and runs at a fault boundary: an exception, or a value that is not a
finite number (``None``, ``"1.0"``, NaN), becomes a NaN reward, and the actor does not train that
sample (the run's ledger counts it as skipped). Failures are told apart by kind (``sandbox.call``): the
first of each kind in this replica goes to the launcher in full (``reward_error``: the row's uid,
prompt and response, the message, the traceback), later ones only as counts in the ``reward`` report,
so a function that fails on every sample costs a count, not a traceback per sample. The launcher stops
the run when every sample of ``max_failed_steps`` steps in a row failed. Anything else that fails (the
bus, a bad ``reward.fn`` path at start-up) fails the role, and the launcher stops the run with its
traceback.

Time limit: with ``timeout_s`` > 0 the function runs in a sandbox process (``roles/sandbox.py``); a
call past the limit is killed and its sample scores NaN with a ``reward_error`` saying so.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

from rlflow.roles import schema
from rlflow.roles import reports
from rlflow.roles.context import RoleContext, ack_work, next_rows
from rlflow.transfer.lifetime import at_exit
from rlflow.plugins import load_object
from rlflow.roles.config import RewardArgs, RewardConfig
from rlflow.roles.sandbox import Sandbox, call
from rlflow.roles.schema import SOURCE_KEY
from rlflow.roles.schema import ENV_FAILURES


def serve(cfg: RewardConfig, ctx: RoleContext, args: RewardArgs | None = None) -> None:
    from transformers import AutoTokenizer

    assert cfg.fn is not None, "the launcher resolves reward.fn=null to the task's own reward"
    sources = args.sources if args is not None and args.sources else None  # data.sources: name -> fn path
    scorers = {path: Scorer(path, cfg.timeout_s) for path in sorted(set(sources.values()) if sources else {cfg.fn})}
    at_exit(lambda: [s.shut() for s in scorers.values()])
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_path)
    ctx.report(reports.READY)
    seen: set[str] = set()  # kinds of failure already reported in full by this replica
    episodes = args is not None and args.episodes
    while True:
        d = next_rows(ctx, "reward", schema.EPISODE_REWARD_INPUT if episodes else schema.REWARD_INPUT, cfg.batch)
        if d is None:
            continue
        t0 = time.monotonic()
        with ctx.timeline.span("score", samples=len(d)):
            responses = d.table.column("response_ids").to_pylist()
            fields = [json.loads(f) for f in d.table.column("fields").to_pylist()]
            if episodes:  # the function scores the last turn, and gets the environment's reward too
                starts = d.table.column("turn_starts").to_pylist()
                responses = [r[s[-1]:] if s else [] for r, s in zip(responses, starts)]
                for f, r in zip(fields, d.table.column("env_reward").to_pylist()):
                    f["env_reward"] = r
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            # An episode whose environment failed has its reward already: env.failure_reward, or NaN (not trained)
            failed = set() if not episodes else {i for i, why in enumerate(d.table.column("finish_reason").to_pylist())
                                                 if why in ENV_FAILURES or math.isnan(fields[i]["env_reward"])}
            scored = [i for i in range(len(texts)) if i not in failed]
            results = [("ok", fields[i]["env_reward"]) if i in failed else None for i in range(len(texts))]
            by_fn: dict[str, list[int]] = {}  # each row to its source's function (one function without sources)
            for i in scored:
                by_fn.setdefault(sources[fields[i].pop(SOURCE_KEY)] if sources else cfg.fn, []).append(i)
            for path, rows in by_fn.items():
                for i, result in zip(rows, scorers[path].score([texts[i] for i in rows], [fields[i] for i in rows])):
                    results[i] = result
        rewards, failures = [], Counter()
        for result, text, f, uid in zip(results, texts, fields, d.uids):
            rewards.append(result[1] if result[0] == "ok" else math.nan)
            if result[0] == "error":
                failures[result[1]] += 1
                if result[1] not in seen:
                    seen.add(result[1])
                    ctx.report(reports.REWARD_ERROR, uid=uid, prompt=f.get("prompt"), response=text, failure=result[1],
                               error=result[2], traceback=result[3])
        ctx.bus.put({"uid": d.uids, "reward": rewards}, missing="skip")
        ack_work(ctx, d)
        ctx.report(reports.WORK, samples=len(rewards), seconds=time.monotonic() - t0, errors=dict(failures))


class Scorer:
    """One reward function: in a sandbox (``reward.timeout_s`` > 0, launched at once so its interpreter
    starts while the role loads its tokenizer) or called in this process."""

    def __init__(self, path: str, timeout_s: float):
        self.fn = load_object(path, "reward.fn")  # imported here too, so a bad path fails at start with its field
        self.sandbox = Sandbox(path, timeout_s) if timeout_s > 0 else None
        if self.sandbox is not None:
            self.sandbox.launch()

    def score(self, texts: list[str], fields: list[dict]) -> list[tuple]:
        if not texts:
            return []
        if self.sandbox is not None:
            return self.sandbox.score(texts, fields)
        return [call(self.fn, text, f) for text, f in zip(texts, fields)]

    def shut(self) -> None:
        if self.sandbox is not None:
            self.sandbox.shut()
