"""Is the reward function working: its failures counted by kind, each kind's first shown in full, and the
verdict that stops a run whose reward failed on every sample of ``reward.max_failed_steps`` steps in a row.

A sample whose reward failed is never trained (the actor skips it); a run that trains nothing for many
steps because the user's function is broken should say so and stop, not spin. The launcher feeds this
the replicas' reports and prints what it returns: the counting and the wording live here.
"""

from __future__ import annotations

from collections import Counter


class RewardHealth:
    def __init__(self, fn: str, max_failed_steps: int, env: str | None = None):
        """``env``: what runs the episodes (``env.cls=...``/``env.agent=...``), when there is an environment."""
        self.fn, self.limit, self.env = fn, max_failed_steps, env
        self.env_first: dict[str, dict] = {}  # kind -> the first env_error report of it (roles/episodes.py)
        self.env_errors: Counter = Counter()
        self.errors: Counter = Counter()  # failed reward calls by kind (roles/sandbox.call), from work reports
        self.first: dict[str, dict] = {}  # kind -> its first reward_error report
        self.failed_steps = 0  # steps in a row whose every sample's reward failed

    def count(self, errors: dict[str, int]) -> None:
        """A work report's failures by kind."""
        self.errors.update(errors)

    def first_of_its_kind(self, ev: dict) -> str | None:
        """What to show of a ``reward_error`` report: the whole of its kind's first (None: a kind already shown,
        by this or another replica)."""
        if ev["failure"] in self.first:
            return None
        self.first[ev["failure"]] = ev
        return (f"reward.fn={self.fn} on row {ev['uid']} (prompt {ev['prompt']!r}, response {ev['response']!r}) "
                f"{ev['error']}. The sample is not trained; later failures of this kind are counted (reward/errors "
                f"in metrics.jsonl, reward_errors in summary.json)")

    def env_failed(self, ev: dict) -> bool:
        """An episode's environment failed (an ``env_error`` report); True for the first of its kind."""
        self.env_errors[ev["failure"]] += 1
        return self.env_first.setdefault(ev["failure"], ev) is ev

    def after_step(self, m: dict) -> tuple[str, str, str] | None:
        """``(title, why, traceback)`` when this step was the ``max_failed_steps``-th in a row to train
        nothing because every sample's reward failed, or every episode's environment did (the run must
        stop); None otherwise. ``m``: the step's metrics."""
        failed = m["samples"] > 0 and m["reward/errors"] == m["samples"]
        self.failed_steps = self.failed_steps + 1 if failed else 0
        if not self.limit or self.failed_steps < self.limit:
            return None
        if self.env and self.env_errors and m.get("env/failures", 0) >= m["samples"]:
            kind, count = self.env_errors.most_common(1)[0]
            first = self.env_first[kind]
            why = (f"every episode of the last {self.limit} steps failed in its environment ({self.env}), so they "
                   f"trained nothing. Most often ({count} episodes, {kind}): {first['error']} (e.g. episode "
                   f"{first['uid']}).\nFix it (`rlflow doctor` with the same overrides checks that it loads), then start "
                   f"again. reward.max_failed_steps={self.limit} sets how many such steps stop a run (0: never).")
            return f"every episode failed in its environment for {self.limit} steps in a row", why, ""
        kind, count = self.errors.most_common(1)[0] if self.errors else ("?", 0)
        first = self.first.get(kind, {})
        example = f"row {first['uid']}: prompt {first['prompt']!r}, response {first['response']!r}" if first else "?"
        why = (f"reward.fn={self.fn} failed on every sample of the last {self.limit} steps (steps "
               f"{m['step'] - self.limit + 1}-{m['step']}), so they trained nothing. Most often ({count} samples) it "
               f"{first.get('error', kind)}; e.g. {example}.\nFix the function (try it on a row of the data), then "
               f"start again. reward.max_failed_steps={self.limit} sets how many such steps stop a run (0: never).")
        return f"reward.fn failed on every sample of {self.limit} steps in a row", why, first.get("traceback", "")

    def rewound(self) -> None:
        """The trainer restarted from a checkpoint: the steps in a row start again."""
        self.failed_steps = 0

    def closing_words(self) -> str | None:
        """The run's end: how many samples the reward failed on, by kind (None: none)."""
        if not self.errors:
            return None
        kinds = ", ".join(f"{kind} ({n})" for kind, n in self.errors.most_common())
        return f"reward.fn={self.fn} failed on {sum(self.errors.values())} samples, none of them trained: {kinds}"

    def summary(self) -> dict:
        """summary.json's reward keys."""
        return {"reward_errors": sum(self.errors.values()), "reward_errors_by_kind": dict(self.errors)}
