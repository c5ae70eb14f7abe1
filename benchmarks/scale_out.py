"""Scale-out on this machine: the default recipe with 1 and 2 rollout replicas under each launcher.

    python -m benchmarks.scale_out                 # 300 steps per run (the default recipe), 4 runs
    python -m benchmarks.scale_out --quick         # 60 steps per run
    python -m benchmarks.scale_out --set flow.staleness=2 --replicas 1 2 4
    python -m benchmarks.scale_out --launchers local --replicas 1 --trainers 1 2   # data-parallel trainers

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


def run(launcher: str, replicas: int, trainers: int, steps: int, extra: list[str], root: Path) -> dict:
    label = f"{launcher}-{replicas}-{trainers}"
    rows, summary, wall = run_recipe(root / label, [f"launcher={launcher}", f"rollout.replicas={replicas}",
                                                    f"actor.replicas={trainers}", f"flow.steps={steps}", *extra],
                                     f"run {label}")
    stats = run_stats(rows, summary, wall)
    ledger = summary["samples"]
    return {"launcher": launcher, "rollout_replicas": replicas, "trainer_replicas": trainers, **stats,
            "outside_training_s": round(wall - stats["train_s"], 2),
            "step_s": round(stats["steady_s"] / max(1, stats["steps"] - 1), 4),
            "samples_by_replica": summary["samples_by_replica"],
            "exactly_once": ledger["consumed_more_than_once"] == 0 and ledger["issued_not_consumed"] == 0
            and ledger["trained"] == ledger["issued"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 steps per run")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300, or 60 with --quick)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="rollout replica counts to run")
    p.add_argument("--launchers", nargs="+", default=["local", "ray"], help="launchers to run")
    p.add_argument("--trainers", type=int, nargs="+", default=[1], help="trainer (actor) replica counts to run")
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run (repeatable)")
    args = p.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as root:
        for trainers in args.trainers:
            for replicas in args.replicas:
                for launcher in args.launchers:
                    print(f"running launcher={launcher} rollout.replicas={replicas} actor.replicas={trainers} "
                          f"for {steps} steps ...", file=sys.stderr, flush=True)
                    results[key(launcher, replicas, trainers)] = r = run(launcher, replicas, trainers, steps,
                                                                         args.set, Path(root))
                    print(json.dumps(r), file=sys.stderr, flush=True)
    ratios = {}
    base, t0 = args.replicas[0], args.trainers[0]
    for trainers in args.trainers:
        for launcher in args.launchers:
            for n in args.replicas[1:]:
                ratios[f"{key(launcher, n, trainers)}_vs_{base}_samples_per_s"] = round(
                    results[key(launcher, n, trainers)]["samples_per_s"] / results[key(launcher, base, trainers)]["samples_per_s"], 3)
    for trainers in args.trainers[1:]:
        for launcher in args.launchers:
            for n in args.replicas:
                ratios[f"{key(launcher, n, trainers)}_vs_{t0}_trainers_samples_per_s"] = round(
                    results[key(launcher, n, trainers)]["samples_per_s"] / results[key(launcher, n, t0)]["samples_per_s"], 3)
    if {"local", "ray"} <= set(args.launchers):
        for trainers in args.trainers:
            for n in args.replicas:
                ray_run, local = results[key("ray", n, trainers)], results[key("local", n, trainers)]
                suffix = f"{n}" if trainers == 1 else f"{n}_t{trainers}"
                ratios[f"ray_vs_local_step_s_{suffix}"] = round(ray_run["step_s"] / local["step_s"], 3)
                ratios[f"ray_vs_local_wall_{suffix}"] = round(ray_run["wall_s"] / local["wall_s"], 3)
                ratios[f"ray_minus_local_outside_training_s_{suffix}"] = round(
                    ray_run["outside_training_s"] - local["outside_training_s"], 2)
    print(json.dumps({"benchmark": "scale_out", "steps": steps, "overrides": args.set, **results, **ratios}))


def key(launcher: str, replicas: int, trainers: int) -> str:
    """Result name: launcher and rollout replicas (`local_2`), plus `_t<N>` for N trainer replicas."""
    return f"{launcher}_{replicas}" + ("" if trainers == 1 else f"_t{trainers}")


if __name__ == "__main__":
    main()
