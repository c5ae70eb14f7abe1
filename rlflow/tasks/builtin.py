"""Built-in synthetic verifiable tasks: endless prompt records and the reward that checks them.

A task is a record generator ``make(rng, cfg) -> {"prompt": str, "answer": str}`` plus the dotted
path of its reward in ``tasks/rewards.py``. The answer doubles as the demonstration the tiny model's
warm-start is trained on (``engines/tiny.py``). All tasks are short ASCII (a few tokens of the tiny
model's byte tokenizer) and solvable by a 2-layer model.

- reverse: "40713=" -> "31704". Positional partial credit: a dense signal a tiny policy can climb.
- sort:    "40713=" -> "01347". Positional partial credit.
- add:     "27+58=" -> "85". Exact match.
- calc:    "37*48=" -> "1776", with a calculator tool (multi-turn: ``rlflow -cn tool_calc``). A tiny model
           cannot multiply, but it can call ``calc(37*48)`` and copy the result: only using the tool pays.
           Exact match on the last turn.
- guess:   "guess 2:" -> a hidden number, found by guessing with per-digit hints from the environment
           (multi-turn: ``rlflow -cn guess``; ``tasks/guess.py``). The environment's reward.

A task may also give ``demo(rng, record) -> [(who, text), ...]``: a multi-turn demonstration for the
warm-start, ``who`` being ``model`` (a turn, trained, ended by <eos>) or ``env`` (an observation, not trained).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from rlflow.tasks import guess


@dataclass
class Task:
    make: Callable[[random.Random, int, int], dict]  # (rng, min_digits, max_digits) -> record
    reward: str  # dotted path of the reward function
    demo: Callable[[random.Random, dict], list[tuple[str, str]]] | None = None  # multi-turn warm-start demonstration


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random, lo: int, hi: int) -> dict:
    s = _digits(rng, lo, hi)
    return {"prompt": s + "=", "answer": s[::-1]}


def _sort(rng: random.Random, lo: int, hi: int) -> dict:
    s = _digits(rng, lo, hi)
    return {"prompt": s + "=", "answer": "".join(sorted(s))}


def _add(rng: random.Random, lo: int, hi: int) -> dict:
    a, b = (rng.randint(0, 10 ** rng.randint(lo, hi) - 1) for _ in range(2))
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def _calc(rng: random.Random, lo: int, hi: int) -> dict:
    a, b = (rng.randint(10 ** (d - 1), 10 ** d - 1) for d in (rng.randint(lo, hi), rng.randint(lo, hi)))
    return {"prompt": f"{a}*{b}=", "answer": str(a * b)}


CALC_TOOL_SHARE = 0.5  # of warm-start demonstrations that call the tool; the rest answer directly (and
# cannot be right): the policy starts using the tool about this often, and RL has to learn that it pays


def _calc_demo(rng: random.Random, record: dict) -> list[tuple[str, str]]:
    from rlflow.envs.tools import RESULTS

    if rng.random() >= CALC_TOOL_SHARE:
        return [("model", record["answer"])]
    return [("model", f"calc({record['prompt'].rstrip('=')})"), ("env", RESULTS["call"].format(result=record["answer"])),
            ("model", record["answer"])]


TASKS: dict[str, Task] = {
    "reverse": Task(_reverse, "rlflow.tasks.rewards.positional_match"),
    "sort": Task(_sort, "rlflow.tasks.rewards.positional_match"),
    "add": Task(_add, "rlflow.tasks.rewards.exact_match"),
    "calc": Task(_calc, "rlflow.tasks.rewards.exact_match", demo=_calc_demo),
    "guess": Task(guess.make, "rlflow.tasks.rewards.env_reward", demo=guess.demo),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is not a built-in task; choose one of {sorted(TASKS)} "
                         f"or give data.path=FILE.jsonl|parquet with a reward.fn")
    return TASKS[name]
