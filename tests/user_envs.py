"""Environments the tests run as a user's would be: imported by dotted path in environment workers (so
this module imports nothing heavy: every worker imports it)."""

from __future__ import annotations


class FlakyEnv:
    """An environment that misbehaves as its record says (``behaviour``): raises, hangs, kills its own
    process, or plays a 3-turn game whose reward is the turn count ("ok"); ``sleep`` slows every step."""

    KINDS = ["ok"] * 5 + ["raise", "hang", "die"]

    def __init__(self, sleep: float = 0.0, behaviour: str | None = None):
        self.sleep, self.turns, self.fixed = sleep, 0, behaviour

    def reset(self, record: dict):
        # a built-in task's record has no ``behaviour``: one of KINDS by its prompt's digits
        digits = sum(int(c) for c in record.get("prompt", "") if c.isdigit())
        self.behaviour = self.fixed or record.get("behaviour") or self.KINDS[digits % len(self.KINDS)]
        return " go:"

    def step(self, action: str):
        import os
        import time

        time.sleep(self.sleep)
        self.turns += 1
        if self.behaviour == "raise":
            raise RuntimeError("the environment broke")
        if self.behaviour == "hang":
            time.sleep(3600)
        if self.behaviour == "die":
            os._exit(3)
        if self.behaviour == "bad":
            return "observation", "not a number", False
        import sys

        info = {"turn": 1, "ray": float("ray" in sys.modules)}  # ray: run in a Ray actor (ray.env.actors=true)
        return (None, 1.0, True, info) if self.turns >= 3 else (f" t{self.turns}:", 0.0, False, info)


async def scripted_agent(record: dict, base_url: str, log: str | None = None, script: str | None = None):
    """An agent as a user writes one, with the openai client; what it does is its record's ``script``:
    "chat" (``turns`` calls, each answered with a tool message), "raise", "hang" (never calls, never
    returns), "garbage" (returns no number), "silent" (returns without calling), "linger" (keeps
    running after its episode is over); ``script`` gives one for every episode. With ``log`` (a
    directory) it writes what it got there."""
    import asyncio
    import json
    import os
    import uuid

    import openai

    script = script or record.get("script", "chat")
    if script == "raise":
        raise RuntimeError("the agent broke")
    if script == "hang":
        await asyncio.sleep(3600)
    if script == "garbage":
        return "not a reward"
    if script == "silent":
        return 0.5
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        messages = [{"role": "user", "content": record["prompt"]}]
        got = []
        for turn in range(record.get("turns", 2)):
            try:
                cut = {k: record[k] for k in ("stop", "max_tokens") if k in record}
                reply = await client.chat.completions.create(model="policy", messages=messages, logprobs=True, **cut)
            except openai.APIStatusError:
                if script == "linger":
                    await asyncio.sleep(3600)
                raise
            choice = reply.choices[0]
            messages.append(choice.message)  # the client's own object, as agents commonly do
            got.append({"token_ids": choice.model_extra["token_ids"], "version": reply.system_fingerprint,
                        "logprobs": [t.logprob for t in choice.logprobs.content], "content": choice.message.content})
            messages.append({"role": "tool", "content": f" -> {turn}\n"})
    if log:
        with open(os.path.join(log, f"{uuid.uuid4().hex}.json"), "w") as f:
            json.dump({"prompt": record["prompt"], "calls": got, "observations": [m["content"] for m in messages
                                                                                  if isinstance(m, dict) and m["role"] == "tool"]}, f)
    return float(sum(len(c["token_ids"]) for c in got)), {"calls": len(got)}  # a reward that varies: tokens sampled
