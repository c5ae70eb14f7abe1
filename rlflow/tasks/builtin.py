"""Built-in synthetic verifiable tasks: endless prompt records and the reward that checks them.

A task is a record generator ``make(rng, cfg) -> {"prompt": str, "answer": str}`` plus the dotted
path of its reward in ``tasks/rewards.py``. The answer doubles as the demonstration the tiny model's
warm-start is trained on (``engines/tiny.py``). All tasks are short ASCII (a few tokens of the tiny
model's byte tokenizer) and solvable by a 2-layer model.

- reverse: "40713=" -> "31704". Positional partial credit: a dense signal a tiny policy can climb.
- sort:    "40713=" -> "01347". Positional partial credit.
- add:     "27+58=" -> "85". Exact match.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


@dataclass
class Task:
    make: Callable[[random.Random, int, int], dict]  # (rng, min_digits, max_digits) -> record
    reward: str  # dotted path of the reward function


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


TASKS: dict[str, Task] = {
    "reverse": Task(_reverse, "rlflow.tasks.rewards.positional_match"),
    "sort": Task(_sort, "rlflow.tasks.rewards.positional_match"),
    "add": Task(_add, "rlflow.tasks.rewards.exact_match"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"data.task={name!r} is not a built-in task; choose one of {sorted(TASKS)} "
                         f"or give data.path=FILE.jsonl|parquet with a reward.fn")
    return TASKS[name]
