"""A custom environment for multi-turn RL, plugged in by dotted path (rlflow/envs/base.py, docs/agentic.md).

    rlflow env.cls=examples.custom_env.RetryEnv env.max_turns=3 flow.steps=50
    python -m examples.custom_env             # the same, 50 steps, no W&B

The built-in reverse task, with retries: after a wrong answer the model is told how many digits it had
right and answers again, up to 3 times. Each step's reward is what that answer improved on the best
so far, so the episode's reward, the sum of its step rewards, is its best answer's score. The model only
ever sees text; rlflow tokenizes, masks the feedback out of the loss and keeps every token exact.
"""

from __future__ import annotations

from rlflow.tasks.rewards import positional_match


class RetryEnv:
    def reset(self, record: dict) -> None:
        self.answer, self.tries, self.best = record["answer"], 0, 0.0  # record: the task's prompt and answer

    def step(self, action: str):
        self.tries += 1
        score = positional_match(action, self.answer)
        gain, self.best = max(0.0, score - self.best), max(score, self.best)
        if score == 1.0 or self.tries == 3:
            return None, gain, True  # no observation, this step's reward, done
        return f" {round(score * len(self.answer))} right, again=", gain, False


if __name__ == "__main__":
    import sys

    from rlflow.flow.cli import main

    sys.exit(main(["env.cls=examples.custom_env.RetryEnv", "env.max_turns=3", "flow.steps=50", "tracking.wandb=false",
                   *sys.argv[1:]]))
