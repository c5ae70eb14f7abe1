"""Scale-out on this machine: the default recipe with 1 and 2 rollout replicas under each launcher.

    python -m benchmarks.scale_out                 # 300 steps per run (the default recipe), 4 runs
    python -m benchmarks.scale_out --quick         # 60 steps per run
    python -m benchmarks.scale_out --set flow.staleness=2 --replicas 1 2 4

Every run is a real `rlflow` command: `launcher=local` (processes of this machine, ipc sockets) or
`launcher=ray` (a private local Ray cluster started by the run, every role replica a Ray actor, tcp
sockets with CURVE). Per run: wall time, the time outside training (start-up and shutdown: for Ray,
the cluster), steady samples/s, how long and what fraction of its step time the trainer waited for
data, the reward at the start and at the end, and the run's exactly-once ledger.

Ratios, all from runs of this one process: 2 replicas over 1 under each launcher (samples/s), and
Ray over local at each replica count (steady time per step, and wall time: Ray's overhead).

What to expect on a 2-core machine: the trainer, the rollouts and the reward share two cores, so a
second rollout replica adds generation only where a core is idle; the figures say how much.
The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.recipe_run import run_recipe, run_stats


def run(launcher: str, replicas: int, steps: int, extra: list[str], root: Path) -> dict:
    label = f"{launcher}-{replicas}"
    rows, summary, wall = run_recipe(root / label, [f"launcher={launcher}", f"rollout.replicas={replicas}",
                                                    f"flow.steps={steps}", *extra], f"run {label}")
    stats = run_stats(rows, summary, wall)
    ledger = summary["samples"]
    return {"launcher": launcher, "rollout_replicas": replicas, **stats,
            "outside_training_s": round(wall - stats["train_s"], 2),
            "step_s": round(stats["steady_s"] / max(1, stats["steps"] - 1), 4),
            "samples_by_replica": summary["samples_by_replica"],
            "exactly_once": ledger["trained_more_than_once"] == 0 and ledger["issued_not_trained"] == 0
            and ledger["trained"] == ledger["issued"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps per run")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300, or 60 with --quick)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="rollout replica counts to run")
    p.add_argument("--launchers", nargs="+", default=["local", "ray"], help="launchers to run")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run (repeatable)")
    args = p.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as root:
        for replicas in args.replicas:
            for launcher in args.launchers:
                print(f"running launcher={launcher} rollout.replicas={replicas} for {steps} steps ...",
                      file=sys.stderr, flush=True)
                results[f"{launcher}_{replicas}"] = r = run(launcher, replicas, steps, args.set, Path(root))
                print(json.dumps(r), file=sys.stderr, flush=True)
    ratios = {}
    base = args.replicas[0]
    for launcher in args.launchers:
        for n in args.replicas[1:]:
            ratios[f"{launcher}_samples_per_s_{n}_vs_{base}"] = round(
                results[f"{launcher}_{n}"]["samples_per_s"] / results[f"{launcher}_{base}"]["samples_per_s"], 3)
    if {"local", "ray"} <= set(args.launchers):
        for n in args.replicas:
            ray_run, local = results[f"ray_{n}"], results[f"local_{n}"]
            ratios[f"ray_vs_local_step_s_{n}"] = round(ray_run["step_s"] / local["step_s"], 3)
            ratios[f"ray_vs_local_wall_{n}"] = round(ray_run["wall_s"] / local["wall_s"], 3)
            ratios[f"ray_minus_local_outside_training_s_{n}"] = round(
                ray_run["outside_training_s"] - local["outside_training_s"], 2)
    print(json.dumps({"benchmark": "scale_out", "steps": steps, "overrides": args.set, **results, **ratios}))


if __name__ == "__main__":
    main()
