"""The rollout role with an environment: multi-turn episodes, exact tokens, trajectory-level asynchrony.

One row is one episode. The replica keeps up to ``env.workers`` episodes going at once (more queue for a
worker, ``envs/pool.py``), each in one of three states:

    reset -> generate -> env -> generate -> env ... -> finished (put on the bus)

Each pass of the loop (1) applies the newest weights, (2) takes rows while there is room, (3) generates
the next turn of *every* episode that waits for the model, in one batched call, and hands each turn to
its environment, then (4) takes the environments' answers that came in meanwhile. Environments run in
their own processes, so while one episode waits on a slow tool the engine generates for the others:
turns are batched across episodes, and no episode waits for another's environment.

With ``env.agent`` the same loop runs a user's agent function instead (``envs/agent.py``): its chat calls
arrive where observations would (their new messages appended by ``roles/turns.py``), and each
generated turn goes back to it as the call's completion.

Invariants:
- Exact tokens: the row's ``response_ids`` are the tokens the model was given and produced, in order.
  Model tokens are appended as sampled; an observation is tokenized once, by this role, and appended as
  it will be read (``roles/turns.py``: plain text, or the chat template under the exact-prefix rule,
  with a new segment where the template would rewrite history). ``loss_mask`` is 1 exactly on sampled
  tokens, and only those carry ``rollout_logprobs`` (0 elsewhere) and train.
- Per-token versions: weights are applied between turns, never during one; ``token_versions`` records
  each token's policy version (an observation carries its turn's). ``version_start`` is the oldest
  sampled token's: a sample's staleness is measured from it, and since the feeder admitted the row for
  versions >= its ``min_version`` and the first turn ran at one, the staleness bound holds for every token.
- One episode's failure costs that episode: an environment that raises, hangs past
  ``env.step_timeout_s`` or dies ends its episode with finish_reason ``env_error``/``env_timeout``/
  ``env_died`` and reward ``env.failure_reward`` (null: not trained). The episode is still put, so the
  actor consumes it and the ledger accounts for it.
- Nothing is lost: a delivery is acked once every episode of it is on the bus, and its lease is renewed
  while its episodes run (``_renew``); a replica that dies leaves its rows leased, and the launcher hands
  them to another replica.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from rlflow.envs.config import EnvConfig
from rlflow.envs.pool import EnvPool
from rlflow.roles import reports, schema
from rlflow.roles.schema import ENV_FAILURES
from rlflow.roles.turns import ChatTurns, PlainTurns
from rlflow.roles.context import IDLE_WAIT_S, RoleContext, ack_work, next_rows, renew_leases
from rlflow.transfer.lifetime import at_exit

POLL_IDLE_S = 0.05  # how long the loop waits for environments when no episode waits for the model


@dataclass
class Episode:
    """One episode in flight: its row on the bus, and the token stream so far."""

    uid: str
    delivery: int  # the delivery it came in (acked once all of its episodes are put)
    prompt: list[int]
    record: dict
    state: str = "reset"  # reset | generate | env | finished
    tokens: list[int] = field(default_factory=list)  # after the prompt: model and observation tokens
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy
    logprobs: list[float] = field(default_factory=list)  # the sampling policy's, 0 on observation tokens
    versions: list[int] = field(default_factory=list)  # policy version of each token
    turn_starts: list[int] = field(default_factory=list)  # where each model turn starts in ``tokens``
    segment_starts: list[int] = field(default_factory=list)  # where a new context starts (roles/turns.py)
    conversation: object = None  # the messages so far: with a chat template a list, with an agent an AgentChat
    request: dict | None = None  # an agent's chat call being answered (envs/agent.chat_request)
    capped: str = ""  # why an agent's call was refused ('max_turns', 'max_context'): how its episode ends
    last_turn: str | None = None  # the text of the model's last turn
    env_reward: float = 0.0
    info: Counter = field(default_factory=Counter)  # the environment's counters, summed over steps
    env_seconds: float = 0.0
    finish: str = ""
    error: str = ""  # what failed, when the environment did
    started: float = field(default_factory=time.monotonic)
    wall_start: float = field(default_factory=time.time)  # when its worker took it: its span on the timeline

    def context(self) -> list[int]:
        """What the model is given for its next turn: the prompt and everything since, or from the
        start of the current segment."""
        return self.tokens[self.segment_starts[-1]:] if self.segment_starts else self.prompt + self.tokens

    def append(self, ids: list[int], logprobs: list[float] | None, version: int) -> None:
        self.tokens += ids
        self.mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.versions += [version] * len(ids)

    def row(self, failure_reward: float | None) -> dict:
        sampled = [v for v, m in zip(self.versions, self.mask) if m]
        reward = self.env_reward
        if self.finish in ENV_FAILURES:
            reward = math.nan if failure_reward is None else failure_reward
        if not sampled:  # nothing the policy produced: nothing to train
            reward = math.nan
        return {"uid": self.uid, "response_ids": self.tokens, "rollout_logprobs": self.logprobs,
                "version_start": min(sampled, default=0), "version_end": max(sampled, default=0),
                "finish_reason": self.finish, "loss_mask": self.mask, "token_versions": self.versions,
                "turn_starts": self.turn_starts, "segment_starts": self.segment_starts, "env_reward": reward,
                "env_info": json.dumps({"counters": dict(self.info), "env_seconds": round(self.env_seconds, 4),
                                        "seconds": round(time.monotonic() - self.started, 4)})}


class Text:
    """The model's turns as text for the environment, and the stream's growth rule (``roles/turns.py``)."""

    def __init__(self, model_path: str, env_cfg: EnvConfig, chat_template: bool):
        from transformers import AutoTokenizer

        from rlflow.engines.hf import stop_token_ids

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.stop_ids = set(stop_token_ids(model_path))
        self.agent = env_cfg.agent is not None
        self.turns = ChatTurns(self.tok, env_cfg.max_observation_tokens, env_cfg.observation_role) if chat_template \
            else PlainTurns(self.tok, env_cfg.max_observation_tokens)

    def action(self, ids: list[int]) -> str:
        """The text the environment gets for a turn: its tokens without the stop token or special tokens."""
        return self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)

    def cut(self, g, request: dict) -> tuple[list[int], list[float], str, str | None]:
        """An agent's turn as its call asked: ``(ids, logprobs, finish_reason, content)``. Cut after
        ``max_tokens`` tokens, then after the fewest tokens whose text holds the first ``stop`` string
        (``content``: the text before it; None when no stop string cut). The ids kept are a prefix of
        those sampled, so training on them is training on what the engine would have made had it
        stopped there; the rest are dropped."""
        ids, logprobs, finish = list(g.response_ids), list(g.logprobs), g.finish_reason
        if request["max_tokens"] is not None and len(ids) > request["max_tokens"]:
            ids, logprobs, finish = ids[: request["max_tokens"]], logprobs[: request["max_tokens"]], "length"
        text = self.action(ids)
        hits = [text.find(s) for s in request["stop"] or () if s in text]
        if not hits:
            return ids, logprobs, finish, None
        at = min(hits)
        lo, hi = 1, len(ids)  # the fewest tokens whose text reaches past the stop string's start
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if len(self.action(ids[:mid])) > at else (mid + 1, hi)
        return ids[:lo], logprobs[:lo], "stop", text[:at]

    def completion(self, e: Episode, ids: list[int], logprobs: list[float], finish: str, content: str | None,
                   version: int, prompt_tokens: int) -> dict:
        """An agent's call answered (``envs/agent.completion_body`` makes the chat.completion of it): the
        assistant message, and the tokens' logprobs when the call asked for them."""
        message = self.turns.reply(e.conversation, e.last_turn, content)
        shown = None
        if e.request["logprobs"]:
            shown = []
            for t, lp in zip(ids, logprobs):
                token = self.tok.decode([t])
                shown.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": []})
        return {"message": message, "finish_reason": "tool_calls" if message.get("tool_calls") else finish,
                "prompt_tokens": prompt_tokens, "completion_tokens": len(ids), "version": version,
                "logprobs": shown, "token_ids": list(ids)}


def serve_episodes(cfg, env_cfg: EnvConfig, ctx: RoleContext, engine, synced, chat_template: bool = False) -> None:
    """The multi-turn loop (see the module docstring). ``synced(need=None)`` applies the newest weights
    (waiting for version ``need`` when given); ``cfg`` is the RolloutConfig; ``chat_template``: the
    prompts were rendered with the tokenizer's chat template, and so are observations."""
    pool = EnvPool(env_cfg, ctx.env_workers)
    at_exit(pool.shutdown)
    text = Text(ctx.model_path, env_cfg, chat_template)
    sampling = cfg.sampling()
    live: dict[str, Episode] = {}
    deliveries: dict[int, tuple[object, int]] = {}  # id -> (delivery, episodes not yet put)
    next_id, busy = 0, 0.0  # busy: seconds generating since the last report
    batch = env_cfg.scheduling == "batch"
    ctx.report(reports.READY)
    try:
        while True:
            synced()
            # Room for more: take whole groups while no episode waits for a worker (batch: none is live).
            if (not live) if batch else (pool.queued == 0 and len(live) < env_cfg.workers):
                groups = max(1, (env_cfg.workers - len(live)) // cfg.group_size)
                # idle, wait as every role does; with episodes going, take only what is ready now
                d = next_rows(ctx, "rollout", schema.EPISODE_ROLLOUT_INPUT, groups, groups=True,
                              timeout=IDLE_WAIT_S if not live else 0)
                if d is not None:
                    need = max(d.table.column("min_version").to_pylist())
                    synced(need)
                    started = 0
                    for uid, prompt, fields in zip(d.uids, d.table.column("prompt_ids").to_pylist(),
                                                   d.table.column("fields").to_pylist()):
                        if uid in live:  # redelivered after a lease ran out: its episode is still going here
                            continue
                        record = json.loads(fields)
                        live[uid] = Episode(uid, next_id, prompt, record,
                                            conversation=None if text.agent else text.turns.start(record))
                        pool.reset(uid, record)
                        started += 1
                    if started:
                        deliveries[next_id] = (d, started)
                    else:
                        ack_work(ctx, d)
                    next_id += 1
            ready = [e for e in live.values() if e.state == "generate"]
            if batch and any(e.state in ("reset", "env") for e in live.values()):
                ready = []  # the batch baseline: every episode waits for the slowest environment
            if ready:
                busy += _turn(ctx.timeline, engine, ready, sampling, pool, text)
            for out in pool.poll(0.0 if ready else POLL_IDLE_S):
                e = live.get(out.episode)
                if e is not None:
                    _answered(e, out, env_cfg, text, engine.version, pool)
            done = [e for e in live.values() if e.state == "finished"]
            if done:
                _put(ctx, done, env_cfg, pool, live, deliveries, busy)
                busy = 0.0
            renew_leases(ctx, (d for d, _ in deliveries.values()))
    finally:
        pool.shutdown()


def _turn(timeline, engine, ready: list[Episode], sampling, pool: EnvPool, text: Text) -> float:
    """One model turn of every episode in ``ready``, in one batched call; each turn goes to its
    environment. Returns the seconds it took."""
    version, t0 = engine.version, time.monotonic()
    contexts = [e.context() for e in ready]
    with timeline.span("generate", samples=len(ready), version=version, turns=True) as span:
        gens = engine.generate(contexts, sampling)
        span["tokens"] = sum(len(g.response_ids) for g in gens)
    for e, g, context in zip(ready, gens, contexts):
        made_by = version if g.version is None else g.version
        ids, logprobs, finish, content = text.cut(g, e.request) if text.agent else (g.response_ids, g.logprobs, None, None)
        e.turn_starts.append(len(e.tokens))
        e.append(ids, logprobs, made_by)
        e.state, e.last_turn = "env", text.action(ids)
        if text.agent:
            pool.answer(e.uid, text.completion(e, ids, logprobs, finish, content, made_by, len(context)))
        else:
            pool.step(e.uid, e.last_turn)
    return time.monotonic() - t0


def _answered(e: Episode, out, env_cfg: EnvConfig, text: Text, version: int, pool: EnvPool) -> None:
    """An environment's answer to ``e`` (or its agent's next call): the next state, and the observation
    (or the call's new messages) appended."""
    e.env_seconds += out.seconds
    if out.op == "reset":  # a worker holds the episode from here (before, it queued for one)
        e.wall_start = time.time() - out.seconds
    if out.failure is not None:
        e.state, e.finish, e.error = "finished", out.failure, out.error
        return
    if out.request is not None:
        _called(e, out.request, env_cfg, text, version, pool)
        return
    if out.step is not None:
        e.env_reward += out.step.reward
        e.info.update(out.step.info)
        if out.step.done:
            e.state, e.finish = "finished", e.capped or "done"
            return
        if len(e.turn_starts) >= env_cfg.max_turns:
            e.state, e.finish = "finished", "max_turns"
            return
    if out.observation:
        ids, new_segment = text.turns.observation(e.conversation, e.context(), e.last_turn if out.op == "step" else None,
                                                  out.observation)
        if new_segment:
            e.segment_starts.append(len(e.tokens))
        e.append(ids, None, e.versions[-1] if e.versions else version)
    e.state = "generate"


def _called(e: Episode, request: dict, env_cfg: EnvConfig, text: Text, version: int, pool: EnvPool) -> None:
    """An agent's chat call: its new messages appended (``roles/turns.py``), and the episode waits for the
    model. A call past ``env.max_turns`` or longer than ``env.max_context_tokens`` is refused, and the
    episode waits for the agent to return (a call after a refusal ends it)."""
    if e.capped:
        e.state, e.finish = "finished", e.capped
        return
    if len(e.turn_starts) >= env_cfg.max_turns:
        e.capped = "max_turns"
        pool.answer(e.uid, {"refused": f"this episode's calls are used up (env.max_turns={env_cfg.max_turns}): "
                                       f"return its reward", "code": "max_turns"})
        return
    stream = e.context() if e.tokens else []
    chat, ids, new_segment = text.turns.request(e.conversation, stream, request)
    if (length := len(ids) if new_segment else len(stream) + len(ids)) > env_cfg.max_context_tokens:
        e.capped = "max_context"
        pool.answer(e.uid, {"refused": f"this call's conversation is {length} tokens, more than "
                                       f"env.max_context_tokens={env_cfg.max_context_tokens}", "code": "context_length_exceeded"})
        return
    e.conversation = chat
    if new_segment:
        e.segment_starts.append(len(e.tokens))
    e.append(ids, None, e.versions[-1] if e.versions else version)
    e.request, e.state = request, "generate"


def _put(ctx: RoleContext, done: list[Episode], env_cfg: EnvConfig, pool: EnvPool, live: dict,
         deliveries: dict, busy: float) -> None:
    """Put finished episodes on the bus, free their workers, ack each delivery whose episodes are all put."""
    rows = [e.row(env_cfg.failure_reward) for e in done]
    ctx.bus.put({k: [r[k] for r in rows] for k in rows[0]}, missing="skip")
    now = time.time()
    for e in done:
        # One span per episode, on the environment pool's track (observe/timeline.OWN_TRACK): how long an
        # episode holds its worker is what capacity advice needs (observe/capacity.py, stage ``env``).
        ctx.timeline.add("episode", e.wall_start, now - e.wall_start, samples=1, turns=len(e.turn_starts),
                         env_s=round(e.env_seconds, 4))
        pool.close(e.uid)
        del live[e.uid]
        d, left = deliveries[e.delivery]
        deliveries[e.delivery] = (d, left - 1)
        if left == 1:
            del deliveries[e.delivery]
            ack_work(ctx, d)
    failures = Counter(e.finish for e in done if e.finish in ENV_FAILURES)
    ctx.report(reports.WORK, samples=len(done), tokens=sum(sum(e.mask) for e in done),
               seconds=busy, turns=sum(len(e.turn_starts) for e in done), env_seconds=sum(e.env_seconds for e in done),
               env_failures=dict(failures))
    for e in done:
        if e.finish in ENV_FAILURES:
            ctx.report(reports.ENV_ERROR, uid=e.uid, failure=e.finish, error=e.error)
