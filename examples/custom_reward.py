"""A custom reward function, plugged in by dotted path — no fork of rlflow needed.

    rlflow reward.fn=examples.custom_reward.reverse_with_format flow.steps=50
    python -m examples.custom_reward          # the same, 50 steps, no W&B

A reward is ``fn(response: str, **fields) -> float``. ``fields`` is the prompt record: for the built-in
tasks ``prompt`` and ``answer``; for a dataset given by ``data.path`` every column of its row. Ignore
the fields you do not need with ``**_``. If the function raises, the run reports the row and skips that
sample; it does not stop.
"""

from __future__ import annotations


def reverse_with_format(response: str, answer: str, **_) -> float:
    """Positional credit for the reversed digits, plus a small bonus for answering with digits only."""
    response = response.strip()
    hits = sum(a == b for a, b in zip(response, answer))
    credit = hits / max(len(answer), len(response), 1)
    well_formed = response.isdigit() and len(response) == len(answer)
    return 0.9 * credit + 0.1 * well_formed


if __name__ == "__main__":
    import sys

    from flow.cli import main

    sys.exit(main(["reward.fn=examples.custom_reward.reverse_with_format", "flow.steps=50", "tracking.wandb=false",
                   *sys.argv[1:]]))
