"""A custom reward function, plugged in by dotted path — no fork of rlflow needed.

    rlflow reward.fn=examples.custom_reward.reverse_with_format flow.steps=50
    python -m examples.custom_reward          # the same, 50 steps, no W&B

A reward is ``fn(response: str, **fields) -> float``. ``fields`` is the prompt record: for the built-in
tasks ``prompt`` and ``answer``; for a dataset given by ``data.path`` every column of its row. Ignore
the fields you do not need with ``**_``. It must return a finite number (int, float or bool): if it
raises or returns anything else (``None``, a string), the run reports the row once per kind of failure
and does not train that sample; if that happens to every sample of ``reward.max_failed_steps`` steps in
a row, the run stops and says why.
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

    from rlflow.flow.cli import main

    sys.exit(main(["reward.fn=examples.custom_reward.reverse_with_format", "flow.steps=50", "tracking.wandb=false",
                   *sys.argv[1:]]))
