"""Multi-turn episodes with a slow, heavy-tailed tool: turn-level asynchrony vs a batch-synchronous loop.

    python -m benchmarks.agentic               # 30 steps per run
    python -m benchmarks.agentic --steps 60 --k 2

The tool task (``rlflow -cn tool_calc``) with every tool call taking a random time drawn from a
heavy-tailed distribution (lognormal: median ``--median-ms``, sigma ``--sigma``; a few calls take 10x the
median). Four runs, each a real ``rlflow`` process tree on the same cores:

- ``env.scheduling=turn`` (rlflow's): episodes advance independently; while one waits on its tool, the
  engine generates the next turns of the others;
- ``env.scheduling=batch`` (simple loops): every episode of a batch waits for the slowest tool call at
  each turn, and the next batch starts when the last episode ends;

each at ``flow.staleness=0`` and ``k``. Per run: samples/s, the trainer's wait, reward at start and end,
and the wall time to reach a reward level (``--level``). Ratios: turn over batch samples/s at each
staleness. The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.recipe_run import run_recipe, run_stats
from rlflow.envs.tools import ToolEnv


class SlowToolEnv(ToolEnv):
    """``ToolEnv`` whose every step first waits a lognormal time (the slow tool), seeded per episode."""

    def __init__(self, median_ms: float = 100.0, sigma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.median_s, self.sigma = median_ms / 1000.0, sigma

    def reset(self, record: dict):
        self.rng = random.Random(record["prompt"])
        return super().reset(record)

    def step(self, action: str):
        time.sleep(self.median_s * self.rng.lognormvariate(0.0, self.sigma))
        return super().step(action)


def time_to(rows: list[dict], level: float) -> float | None:
    """Seconds from launch until the mean reward over 5 steps first reaches ``level`` (None: never)."""
    for i in range(len(rows)):
        window = rows[max(0, i - 4): i + 1]
        if sum(r["reward/mean"] for r in window) / len(window) >= level:
            return rows[i]["time"]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--k", type=int, default=2, help="the asynchronous runs' flow.staleness")
    p.add_argument("--median-ms", type=float, default=100.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--level", type=float, default=0.8, help="the reward level time_to_level measures")
    p.add_argument("--set", action="append", default=[], help="extra override for every run (repeatable)")
    args = p.parse_args()
    env = ["-cn", "tool_calc", "env.cls=benchmarks.agentic.SlowToolEnv", f"+env.kwargs.median_ms={args.median_ms}",
           f"+env.kwargs.sigma={args.sigma}", f"flow.steps={args.steps}", *args.set]
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as root:
        for staleness in (0, args.k):
            for scheduling in ("turn", "batch"):
                name = f"{scheduling}_k{staleness}"
                print(f"running {name} for {args.steps} steps ...", file=sys.stderr, flush=True)
                rows, summary, wall = run_recipe(Path(root) / name, [*env, f"env.scheduling={scheduling}",
                                                                     f"flow.staleness={staleness}"], name)
                results[name] = {**run_stats(rows, summary, wall), "time_to_level_s": time_to(rows, args.level),
                                 "env_seconds_mean": round(sum(r["env/seconds_mean"] for r in rows) / len(rows), 3),
                                 "turns_mean": round(sum(r["episode/turns_mean"] for r in rows) / len(rows), 3)}
                print(json.dumps(results[name]), file=sys.stderr, flush=True)
    out = {"benchmark": "agentic", "steps": args.steps, "k": args.k, "median_ms": args.median_ms, "sigma": args.sigma,
           "level": args.level, **results}
    for k in (0, args.k):
        out[f"turn_over_batch_samples_per_s_k{k}"] = round(results[f"turn_k{k}"]["samples_per_s"] /
                                                            results[f"batch_k{k}"]["samples_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
