"""The environment interface: what a user writes for multi-turn RL, and the checks on what it returns.

An environment is a class named by dotted path (``env.cls=my_pkg.MyEnv``), built once per episode with
``env.kwargs``, and driven by the rollout role through an environment worker process
(``envs/worker.py``)::

    class MyEnv:
        def reset(self, record: dict) -> str | None:
            '''The episode starts: ``record`` is the prompt record (its ``prompt`` and every other field).
            Return text the model sees before its first turn, after the prompt (None or "": nothing).'''

        def step(self, action: str) -> tuple[str | None, float, bool]:
            '''The model's turn, as text. Return (observation, reward, done): the observation is
            appended to the episode for the next turn (None: nothing), the reward is added to the
            episode's, and done ends the episode. A 4th element, a dict of numbers, is optional: counters
            the run reports per episode (e.g. {"invalid_move": 1}).'''

        def close(self) -> None:   # optional: the episode is over (also after a failure)

Either method may be ``async def``. The episode's reward is the sum of its step rewards, unless the
recipe names a final reward function (``reward.fn``): that gets the last turn's text, the record's
fields and ``env_reward`` (the sum), and its value is what the trainer sees.

Keys of the recipe's ``env`` section: ``cls``, ``kwargs`` (the class's keyword arguments; on the
command line ``+env.kwargs.NAME=VALUE``), ``max_turns``, ``max_observation_tokens``, ``workers``,
``step_timeout_s``, ``failure_reward`` (``envs/config.py``).

Design decisions:
- One instance per episode, in a process of its own (``envs/worker.py``): an environment may keep any
  state, block, leak or crash; the cost is that episode, never the run.
- What an environment returns is checked where it is returned (``check_step``): a wrong shape or type is
  an error naming the class and what was expected, which fails that episode with the message.
- Text in, text out: the rollout role owns tokenization (``roles/episodes.py``), so the tokens trained
  are exactly the tokens the model saw.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Step:
    """What one ``step`` returned, checked."""

    observation: str | None
    reward: float
    done: bool
    info: dict[str, float] = field(default_factory=dict)


def run(value: Any) -> Any:
    """``value``, awaited first when an ``async def`` method returned a coroutine."""
    if inspect.isawaitable(value):
        return asyncio.run(_awaited(value))
    return value


async def _awaited(value):
    return await value


def check_reset(value: Any, cls: str) -> str | None:
    """``reset``'s return value, checked: text or None."""
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{cls}.reset returned {type(value).__name__}: it must return the text shown before the "
                    f"first turn (a str), or None")


def check_step(value: Any, cls: str) -> Step:
    """``step``'s return value, checked: (observation: str | None, reward: number, done: bool[, info])."""
    if not isinstance(value, tuple) or len(value) not in (3, 4):
        shown = f"a {len(value)}-tuple" if isinstance(value, tuple) else type(value).__name__
        raise TypeError(f"{cls}.step returned {shown}: it must return (observation, reward, done) or "
                        f"(observation, reward, done, info)")
    observation, reward, done, *rest = value
    if observation is not None and not isinstance(observation, str):
        raise TypeError(f"{cls}.step returned an observation of type {type(observation).__name__}: a str or None")
    reward = _reward(reward, f"{cls}.step")
    if not isinstance(done, (bool, int)) or done not in (0, 1):
        raise TypeError(f"{cls}.step returned done={done!r}: True or False")
    return Step(observation, reward, bool(done), _counters(rest[0] if rest else {}, f"{cls}.step"))


def check_agent_result(value: Any, fn: str) -> Step:
    """An agent function's return value (``envs/agent.py``), checked: its episode's reward, a number, or
    (reward, counters)."""
    reward, info = value if isinstance(value, tuple) and len(value) == 2 else (value, {})
    if value is None:
        raise TypeError(f"{fn} returned None: it must return the episode's reward (a number), or (reward, counters)")
    return Step(None, _reward(reward, fn), True, _counters(info, fn))


def _reward(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{what} returned reward {value!r}: a finite number")
    return float(value)


def _counters(info: Any, what: str) -> dict[str, float]:
    if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, numbers.Real)
                                             and not isinstance(v, bool) and math.isfinite(float(v))
                                             for k, v in info.items()):
        raise TypeError(f"{what} returned info {info!r:.80}: a dict of names to finite numbers")
    return {k: float(v) for k, v in info.items()}
