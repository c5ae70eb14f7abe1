"""Does following the capacity advice help? Each scenario runs, its advice is followed, and it runs again.

    python -m benchmarks.capacity_advice            # three scenarios, 150 steps each: about 8 minutes
    python -m benchmarks.capacity_advice --quick    # 60 steps each

Scenarios (the default recipe, on this machine's cores):
- ``default``: as shipped (``flow.staleness=1``);
- ``on_policy``: ``flow.staleness=0``, where the trainer waits for every batch by design;
- ``slow_rollout``: ``rollout.max_batch=16``: the rollout decodes 16 sequences at a time instead of 128,
  so generation is several times slower and the trainer starves.

For each: the advice the run printed (``run_dir/report/advice.json``: bottleneck, the measured rates, the
staleness bound that hides generation, the overrides), then a second run with the advice's overrides
applied. Advice that asks for nothing is checked the other way: the second run adds a rollout replica,
which the advice says would not help. Compared: the trainer's mean seconds per steady step (the first
10% of steps left out, as the advice does), its waiting fraction, samples/s, and the reward at the end
(following the advice must not cost learning).

The last line of stdout is one JSON object with every figure; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.recipe_run import run_recipe, run_stats

SCENARIOS = {"default": [], "on_policy": ["flow.staleness=0"], "slow_rollout": ["rollout.max_batch=16"]}


def steady_figures(rows: list[dict]) -> dict:
    kept = rows[len(rows) // 10 + 1:]
    step_s = sum(r["actor/step_s"] for r in kept) / len(kept)
    wait_s = sum(r["actor/wait_s"] for r in kept) / len(kept)
    return {"step_s": round(step_s, 4), "wait_frac": round(wait_s / step_s, 3),
            "samples_per_s": round(sum(r["samples"] for r in kept) / sum(r["actor/step_s"] for r in kept), 1)}


def run_once(root: Path, name: str, overrides: list[str]) -> dict:
    print(f"{name}: rlflow {' '.join(overrides)}", file=sys.stderr, flush=True)
    rows, summary, wall = run_recipe(root / name, overrides, name, report=True)
    advice = json.loads((root / name / "report" / "advice.json").read_text())
    stats = run_stats(rows, summary, wall)
    return {**steady_figures(rows), "wall_s": stats["wall_s"], "reward_final": stats["reward_final"],
            "staleness_mean": stats["staleness_mean"], "advice": advice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 steps per run instead of 150")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    steps = 60 if args.quick else 150
    out = {"benchmark": "capacity_advice", "steps": steps, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="rlflow-capacity-") as tmp:
        root = Path(tmp)
        for name in args.scenarios:
            base_overrides = [f"flow.steps={steps}", *SCENARIOS[name]]
            base = run_once(root, name, base_overrides)
            a = base["advice"]
            followed = a["overrides"] or ["rollout.replicas=2"]  # nothing to follow: test its "would not help"
            after = run_once(root, f"{name}_followed", base_overrides + followed)
            out["scenarios"][name] = {
                "advice": {k: a[k] for k in ("bottleneck", "overrides", "staleness", "staleness_min", "demand",
                                             "train_s", "wait_s", "generate_s", "publish_s", "disseminate_s", "lines")}
                | {"capacity": {r: round(s["capacity"], 1) for r, s in a["stages"].items()}},
                "applied": followed, "advice_asked_for_it": bool(a["overrides"]),
                "base": {k: v for k, v in base.items() if k != "advice"},
                "followed": {k: v for k, v in after.items() if k != "advice"},
                "followed_advice": {k: after["advice"][k] for k in ("bottleneck", "overrides")},
                "step_s_ratio": round(after["step_s"] / base["step_s"], 3),
                "samples_per_s_ratio": round(after["samples_per_s"] / base["samples_per_s"], 3),
            }
            s = out["scenarios"][name]
            print(f"  {name}: bottleneck {a['bottleneck']}, applied {followed}: step {base['step_s']:.3f}s -> "
                  f"{after['step_s']:.3f}s ({s['step_s_ratio']:.2f}x), wait {base['wait_frac']:.0%} -> "
                  f"{after['wait_frac']:.0%}", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
