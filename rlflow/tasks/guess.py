"""``guess``: an interactive task of several turns where only the environment's feedback leads to the answer.

The model guesses a hidden number of ``digits`` digits; after each guess the environment answers with one
hint per position, ``+`` (the hidden digit is higher), ``-`` (lower) or ``=`` (right), and the model
guesses again. Without the hints a 2-digit number is found within 4 guesses about 4% of the time; halving
each digit's range on its hint always finds it. Reward: 1 when found, else the share of right
digits in the last guess, halved.

    "guess 2:"  ->  "44" " +-\n"  "76" " -+\n"  "58" " ==\n"  (found: reward 1)

The warm-start shows the protocol, and the halving strategy in 3 of 4 demonstrations (the others guess at
random): the policy starts out using the hints imperfectly, and RL has to find that using them pays.
"""

from __future__ import annotations

import random

PROMPT = "guess {digits}:"


def make(rng: random.Random, lo: int, hi: int) -> dict:
    digits = rng.randint(lo, hi)
    return {"prompt": PROMPT.format(digits=digits), "answer": "".join(rng.choice("0123456789") for _ in range(digits))}


def hints(guess: str, answer: str) -> str:
    return "".join("=" if g == a else ("+" if a > g else "-") for g, a in zip(guess, answer))


IGNORE_SHARE = 0.25  # of warm-start demonstrations that guess at random, ignoring the hints: the policy
# starts out using the feedback only part of the time, and RL has to learn that using it pays


def demo(rng: random.Random, record: dict) -> list[tuple[str, str]]:
    """Per-digit halving from a random first guess, or (``IGNORE_SHARE`` of them) random guesses."""
    answer = record["answer"]
    ignore = rng.random() < IGNORE_SHARE
    low, high = [0] * len(answer), [9] * len(answer)
    guess = "".join(str(rng.randint(0, 9)) for _ in answer)
    out = []
    for _ in range(GuessEnv.MAX_GUESSES):
        out.append(("model", guess))
        h = hints(guess, answer)
        if guess == answer:
            break
        out.append(("env", f" {h}\n"))
        for i, (g, mark) in enumerate(zip(guess, h)):
            if mark == "+":
                low[i] = int(g) + 1
            elif mark == "-":
                high[i] = int(g) - 1
            else:
                low[i] = high[i] = int(g)
        guess = "".join(str(rng.randint(0, 9) if ignore else (lo + hi) // 2) for lo, hi in zip(low, high))
    return out


class GuessEnv:
    """The environment of the guess task (see the module docstring)."""

    MAX_GUESSES = 4

    def reset(self, record: dict) -> None:
        self.answer, self.guesses = record["answer"], 0

    def step(self, action: str):
        guess = action.strip()
        self.guesses += 1
        valid = len(guess) == len(self.answer) and guess.isdigit()
        if valid and guess == self.answer:
            return None, 1.0, True, {"guesses": 1}
        if self.guesses >= self.MAX_GUESSES:
            right = sum(g == a for g, a in zip(guess, self.answer)) if valid else 0
            return None, 0.5 * right / len(self.answer), True, {"guesses": 1, "invalid": int(not valid)}
        if not valid:
            return f" ? {len(self.answer)} digits\n", 0.0, False, {"guesses": 1, "invalid": 1}
        return f" {hints(guess, self.answer)}\n", 0.0, False, {"guesses": 1}
