"""Stability far off-policy: the default task at several staleness bounds, sequence-TIS alone vs with VCPO.

    python -m benchmarks.staleness_sweep                       # staleness 0 4 16 64 x {tis, vcpo}, 300 steps
    python -m benchmarks.staleness_sweep --quick               # staleness 0 16, 60 steps
    python -m benchmarks.staleness_sweep --staleness 64 --variants vcpo_opob   # with OPOB too (slow)
    python -m benchmarks.staleness_sweep --staleness 0 64 --set actor.lr=3e-4  # another regime

Every cell is a real `rlflow` process tree (bus, actor, rollout, reward) running the default recipe
with ``flow.staleness=k`` and, for both variants, the off-policy base of VCPO's runs: the decoupled
objective (``actor.old_logprobs=recompute``) with sequence-level truncated IS, C = 8. The variants:
- ``tis``: that base alone (GRPO group-mean advantages);
- ``vcpo``: plus VCPO's step size: the step's learning rate scaled by sqrt(ESS / B) (``actor.vcpo=true``);
- ``vcpo_opob``: plus VCPO's off-policy optimal baseline as well (``actor.advantage=opob``). Not in the
  default set: its per-trajectory gradient norms cost one single-sample backward each, which on these
  2-core machines makes a step 10-20x slower (about 20 minutes per 300-step cell instead of 1.5).

The regime (``--set``, default ``REGIME``) is chosen so that plain off-policy training degrades at
high staleness: see docs/benchmarks.md, "Off-policy stability, measured", for how it was chosen.

Per cell:
- ``reward_final``: the *final policy's* mean reward on a fixed set of held-out prompts, sampled as in
  training. The training curve's reward is that of samples generated up to k versions earlier, so at
  high staleness it lags the policy by k steps; the evaluation does not.
- ``reward_train_last``: mean training reward over the last 10% of steps (the lagged view).
- ``worst_drawdown``: the largest fall of the training reward's running mean (window 10% of the
  steps) below its best value so far: how much ground a run lost, i.e. instability.
- ``ess_min`` / ``ess_mean``: the step ESS ratio of the sequence importance weights.
- ``wall_s``: the whole command; ``step_s``: the trainer's mean step time.

The last line of stdout is one JSON object with every figure; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

from benchmarks.recipe_run import run_recipe

BASE = ["actor.old_logprobs=recompute", "actor.correction=tis", "actor.correction_level=sequence", "actor.is_cap=8"]
VARIANTS = {"tis": [], "vcpo": ["actor.vcpo=true"], "vcpo_opob": ["actor.vcpo=true", "actor.advantage=opob"]}
REGIME = ["actor.lr=1e-3"]
"""Overrides of the default recipe under which off-policy training degrades. At the default lr 3e-4,
sequence-TIS at staleness 64 only learns slower (final-policy reward 0.41 vs 0.64 at staleness 0) and
never loses ground; at 1e-3 it peaks and then falls back (see docs/benchmarks.md, "Off-policy stability, measured")."""


def run_cell(staleness: int, variant: str, steps: int, extra: list[str], root: Path, seed: int) -> dict:
    run_dir = root / f"{variant}-k{staleness}"
    rows, summary, wall = run_recipe(run_dir, [f"flow.staleness={staleness}", f"flow.steps={steps}", f"seed={seed}",
                                               *BASE, *VARIANTS[variant], *extra], f"cell {variant} k={staleness}")
    rewards = [r["reward/mean"] for r in rows]
    window = max(1, len(rows) // 10)
    return {
        "staleness": staleness, "variant": variant, "steps": len(rows), "model_path": summary["model_path"],
        "reward_final": evaluate(str(run_dir / "checkpoints" / "final"), summary["model_path"]),
        "reward_train_last": round(sum(rewards[-window:]) / window, 4),
        "worst_drawdown": round(worst_drawdown(rewards, window), 4),
        "ess_min": round(min(r["ess/ratio"] for r in rows), 4),
        "ess_mean": round(sum(r["ess/ratio"] for r in rows) / len(rows), 4),
        "lr_factor_mean": round(sum(r["lr/factor"] for r in rows) / len(rows), 4),
        "staleness_mean": round(sum(r["staleness/mean"] for r in rows) / len(rows), 2),
        "wall_s": round(wall, 1),
        "step_s": round(sum(r["actor/step_s"] - r["actor/wait_s"] for r in rows) / len(rows), 3),
    }


def worst_drawdown(values: list[float], window: int) -> float:
    """Largest drop of the running mean (over ``window`` steps) below its best earlier value."""
    peak, worst = -math.inf, 0.0
    for i in range(window, len(values) + 1):
        mean = sum(values[i - window: i]) / window
        peak = max(peak, mean)
        worst = max(worst, peak - mean)
    return worst


EVAL = {"prompts": 256, "samples": 4, "seed": 12345, "task": "reverse", "min_digits": 3, "max_digits": 5,
        "max_new_tokens": 8, "temperature": 1.0}
"""The held-out evaluation: the default recipe's task and sampling, prompts from a seed no run uses."""


def evaluate(checkpoint: str, tokenizer_path: str, **kw) -> dict:
    """Mean reward (and its standard error) of ``checkpoint`` sampled on the fixed evaluation prompts."""
    import torch
    from transformers import AutoTokenizer

    from rlflow.engines.hf import HFRolloutEngine
    from rlflow.engines.base import SamplingParams
    from rlflow.plugins import load_object
    from rlflow.roles.config import RolloutConfig
    from rlflow.tasks.builtin import get_task

    e = {**EVAL, **kw}
    torch.set_num_threads(2)
    task, rng = get_task(e["task"]), random.Random(e["seed"])
    records = [task.make(rng, e["min_digits"], e["max_digits"]) for _ in range(e["prompts"])]
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    engine = HFRolloutEngine(checkpoint, RolloutConfig(device="cpu", dtype="float32", max_batch=256, seed=e["seed"]))
    prompts = [tok(r["prompt"])["input_ids"] for r in records for _ in range(e["samples"])]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=e["max_new_tokens"], temperature=e["temperature"]))
    reward = load_object(task.reward, "reward.fn")
    per_prompt = [sum(reward(tok.decode(g.response_ids, skip_special_tokens=True), **records[i])
                      for g in gens[i * e["samples"]: (i + 1) * e["samples"]]) / e["samples"]
                  for i in range(e["prompts"])]
    mean = sum(per_prompt) / len(per_prompt)
    sd = (sum((x - mean) ** 2 for x in per_prompt) / (len(per_prompt) - 1)) ** 0.5
    return {"mean": round(mean, 4), "stderr": round(sd / len(per_prompt) ** 0.5, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="staleness 0 and 16, 60 steps")
    p.add_argument("--steps", type=int, default=None, help="steps per cell (default 300, 60 with --quick)")
    p.add_argument("--staleness", type=int, nargs="+", default=None, help="bounds to sweep (default 0 4 16 64)")
    p.add_argument("--variants", nargs="+", default=["tis", "vcpo"], choices=list(VARIANTS))
    p.add_argument("--set", action="append", default=None, help="recipe override for every cell (repeatable; "
                   "replaces the default regime)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep the run directories here (default: a temporary directory)")
    args = p.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    ks = args.staleness or ([0, 16] if args.quick else [0, 4, 16, 64])
    extra = REGIME if args.set is None else args.set
    cells = []
    with tempfile.TemporaryDirectory(prefix="rlflow-sweep-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for k in ks:
            for variant in args.variants:
                print(f"[{len(cells) + 1}/{len(ks) * len(args.variants)}] {variant} staleness={k}, {steps} steps ...",
                      file=sys.stderr, flush=True)
                cells.append(run_cell(k, variant, steps, extra, root, args.seed))
                print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
        start = evaluate(cells[0]["model_path"], cells[0]["model_path"])  # version 0, the same for every cell
    cells.sort(key=lambda c: (c["staleness"], list(VARIANTS).index(c["variant"])))
    print_table(cells, start)
    print(json.dumps({"benchmark": "staleness_sweep", "steps": steps, "overrides": extra, "base": BASE,
                      "variants": VARIANTS, "eval": EVAL, "reward_start": start, "cells": cells}))


def print_table(cells: list[dict], start: dict) -> None:
    print(f"start policy: eval reward {start['mean']:.3f} ± {start['stderr']:.3f}", file=sys.stderr)
    print("| staleness | variant | final reward (eval) | train reward, last 10% | worst drawdown | min ESS ratio | "
          "mean LR factor | wall s |", file=sys.stderr)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for c in cells:
        print(f"| {c['staleness']} | {c['variant']} | {c['reward_final']['mean']:.3f} ± {c['reward_final']['stderr']:.3f} | "
              f"{c['reward_train_last']:.3f} | {c['worst_drawdown']:.3f} | {c['ess_min']:.3f} | "
              f"{c['lr_factor_mean']:.3f} | {c['wall_s']:.0f} |", file=sys.stderr)


if __name__ == "__main__":
    main()
