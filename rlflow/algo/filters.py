"""Which groups carry a training signal: the criteria of dynamic sampling (``data.filter_groups``).

A criterion is a plain function ``fn(rewards: list[float]) -> bool``, True to keep (train) the group;
name your own by dotted path in ``data.filter_fn``. It sees the group's scored rewards only: a sample
whose reward failed is skipped before (``algo/step.py``).

A curriculum (``data.curriculum``) is ``fn(record, history) -> bool``, True to issue the prompt; the feeder
asks it before each prompt, with what the run has seen of that prompt (None: nothing yet; else
``{"groups": n, "reward_mean": r}``). Torch-free.
"""

from __future__ import annotations


def rewards_differ(rewards: list[float]) -> bool:
    """DAPO's rule: a group whose rewards are all equal has zero advantage for every sample (a group
    baseline subtracts them all away), so it adds no gradient; keep only groups whose rewards differ."""
    return len(set(rewards)) > 1


def unsolved(record: dict, history: dict | None) -> bool:
    """Issue a prompt unless every sample of every group of it so far had reward 1 (solved: no signal left)."""
    return history is None or history["reward_mean"] < 1.0
