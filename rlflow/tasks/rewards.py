"""Built-in verifiable rewards: plain functions ``fn(response: str, **fields) -> float``.

``fields`` are the prompt record's columns (``prompt``, ``answer``, anything a user's dataset has), so
a reward for a user task is a function of the response and its own record — name it in the recipe
with ``reward.fn=my_pkg.my_reward``. Rewards ignore fields they do not need (hence ``**_``).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def positional_match(response: str, answer: str, **_) -> float:
    """Fraction of positions where the response has the answer's character: partial credit in [0, 1].

    Dividing by the longer of the two penalises a response that is too long as much as one too short.
    """
    response = response.strip()
    if not answer and not response:
        return 1.0
    hits = sum(a == b for a, b in zip(response, answer))
    return hits / max(len(answer), len(response))


def env_reward(response: str, env_reward: float, **_) -> float:
    """Multi-turn episodes: the environment's own reward, the sum of its step rewards (``envs/base.py``)."""
    return env_reward


def exact_match(response: str, answer: str, **_) -> float:
    """1.0 when the stripped response equals the answer, else 0.0."""
    return float(response.strip() == str(answer).strip())


def last_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators ("1,234.0" -> "1234.0"), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def math_answer(response: str, answer: str, **_) -> float:
    """GSM8K-style: the response's last number equals the reference's (the part after '####' if present)."""
    reference = last_number(str(answer).split("####")[-1])
    predicted = last_number(response)
    if reference is None or predicted is None:
        return 0.0
    try:
        return float(abs(float(predicted) - float(reference)) < 1e-6)
    except ValueError:
        return 0.0
