"""Asynchronous vs on-policy: the default recipe at flow.staleness=0 and at staleness k, same steps and seed.

    python -m benchmarks.async_speedup                 # 300 steps each (the default recipe), k = 1
    python -m benchmarks.async_speedup --quick         # 60 steps each
    python -m benchmarks.async_speedup --k 2 --steps 200 --set rollout.replicas=2

Each run is a real `rlflow` process tree (bus, actor, rollout, reward) on the same cores. Per run:
wall time (the whole command), training time (launch to last step), steady samples/s (first to last
step), how long the trainer waited for data and how long it computed, how long the rollouts and the
reward worked, and the reward at the start and at the end. Ratios: speedup (staleness 0 time over
staleness k time) and the final-reward difference.

Why the speedup has a ceiling here: with staleness 0 a step costs generate + train (+ hand-offs); with
k >= 1 generation of step s + 1 overlaps training of step s, so a step costs max(generate, train). On
2 cores with one rollout and one trainer process the best case is (g + t) / max(g, t) <= 2.

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.recipe_run import run_recipe, run_stats


def run(staleness: str, steps: int, extra: list[str], root: Path) -> dict:
    run_dir = root / f"staleness-{staleness}"
    rows, summary, wall = run_recipe(run_dir, [f"flow.staleness={staleness}", f"flow.steps={steps}", *extra],
                                     f"run at staleness {staleness}")
    return {"staleness": None if staleness == "null" else int(staleness), **run_stats(rows, summary, wall)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps per run")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300, or 60 with --quick)")
    p.add_argument("--k", default="1", help="the asynchronous run's flow.staleness (an int, or null)")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for both runs (repeatable)")
    args = p.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as root:
        results = {}
        for staleness in ("0", args.k):
            print(f"running staleness={staleness} for {steps} steps ...", file=sys.stderr, flush=True)
            results[f"staleness_{staleness}"] = r = run(staleness, steps, args.set, Path(root))
            print(json.dumps(r), file=sys.stderr, flush=True)
    sync, asyn = results["staleness_0"], results[f"staleness_{args.k}"]
    out = {
        "benchmark": "async_speedup", "steps": steps, "k": args.k, "overrides": args.set,
        **results,
        "speedup_wall": round(sync["wall_s"] / asyn["wall_s"], 3),
        "speedup_train": round(sync["train_s"] / asyn["train_s"], 3),
        "speedup_steady": round(sync["steady_s"] / asyn["steady_s"], 3),
        "reward_final_diff": round(asyn["reward_final"] - sync["reward_final"], 4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
