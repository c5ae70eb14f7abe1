"""User code the end-to-end tests plug in by dotted path, as a user would (reward.fn=..., rollout.engine=...)."""

from __future__ import annotations

from rlflow.engines.hf import HFRolloutEngine


def reward_raising_on_sevens(response: str, expected: str, **_) -> float:
    """Positional credit against the dataset's own `expected` column; raises when the response has a 7."""
    if "7" in response:
        raise ArithmeticError("sevens are not allowed")
    hits = sum(a == b for a, b in zip(response.strip(), expected))
    return hits / max(len(expected), len(response.strip()), 1)


class NeverStoppingEngine(HFRolloutEngine):
    """The built-in engine with no stop token: every response runs to max_new_tokens (long generations)."""

    def __init__(self, model_path, cfg, *lora):
        import torch

        super().__init__(model_path, cfg, *lora)
        self.stop_ids = torch.tensor([], dtype=torch.long)


class CrashingEngine(HFRolloutEngine):
    """The built-in engine, except that its second generate call raises."""

    calls = 0

    def generate(self, prompts, sampling):
        CrashingEngine.calls += 1
        print(f"CrashingEngine: call {CrashingEngine.calls}", flush=True)  # what a user's debugging print looks like
        if CrashingEngine.calls == 2:
            raise RuntimeError("engine exploded on purpose")
        return super().generate(prompts, sampling)


def reward_hanging_on_eights(response: str, **_) -> float:
    """1.0, except that a response with an 8 never returns (an endless loop holding the GIL)."""
    while "8" in response:
        pass
    return 1.0


def reward_exiting_on_nines(response: str, **_) -> float:
    """1.0, except that a response with a 9 takes the whole interpreter down."""
    if "9" in response:
        import os

        os._exit(3)
    return 1.0


def reward_returning_none(response: str, **_):
    """A reward function with a forgotten ``return``: every call returns None."""
    hits = len(response)  # noqa: F841 - computed, never returned


class TrainerWithoutSampling:
    """A train engine written for the constructor before it took the rollout's sampling parameters."""

    def __init__(self, model_path: str, cfg):
        self.version = 0


class PlainEngine(HFRolloutEngine):
    """The built-in engine behind the plain constructor a user's engine may have: no lora argument."""

    def __init__(self, model_path, cfg):
        super().__init__(model_path, cfg)


def reward_varying_on_thirds(response: str, answer: str, **_) -> float:
    """Signal only where the number is divisible by 3: positional match there; elsewhere every response
    gets the same reward (1 or 0 by the remainder), so those groups carry none (dynamic sampling's test)."""
    from rlflow.tasks.rewards import positional_match

    remainder = int(answer) % 3  # the answer is the number reversed: the same digit sum, the same remainder
    return positional_match(response, answer) if remainder == 0 else float(remainder == 1)


def reward_one(response: str, **_) -> float:
    """1.0 for any response: a source whose reward is known exactly (the mixture test)."""
    return 1.0
