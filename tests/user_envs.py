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
        return (None, 1.0, True, {"turn": 1}) if self.turns >= 3 else (f" t{self.turns}:", 0.0, False, {"turn": 1})
