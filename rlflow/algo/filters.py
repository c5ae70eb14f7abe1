"""Which groups carry a training signal: the criteria of dynamic sampling (``data.filter_groups``).

A criterion is a plain function ``fn(rewards: list[float]) -> bool``, True to keep (train) the group;
name your own by dotted path in ``data.filter_fn``. It sees the group's scored rewards only: a sample
whose reward failed is skipped before (``algo/step.py``). Torch-free.
"""

from __future__ import annotations


def rewards_differ(rewards: list[float]) -> bool:
    """DAPO's rule: a group whose rewards are all equal has zero advantage for every sample (a group
    baseline subtracts them all away), so it adds no gradient; keep only groups whose rewards differ."""
    return len(set(rewards)) > 1
