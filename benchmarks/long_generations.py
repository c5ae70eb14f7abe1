"""Long, long-tailed generations: weights applied between calls vs in flight, at the same staleness.

    python -m benchmarks.long_generations                  # 80 steps per arm
    python -m benchmarks.long_generations --quick          # 25 steps per arm
    python -m benchmarks.long_generations --arms between_calls in_flight:keep
    python -m benchmarks.long_generations --part filter   # dynamic sampling only

The task is digit reversal with a long-tailed length: the number of digits of each prompt is drawn
from a log-normal (median 4, ``--sigma`` 1: about one in a hundred over 40, at most ``--longest``
120), so the responses' lengths vary tenfold and more, as reasoning traces do. The tiny model is
warm-started on these records (its answers end after as many digits as the prompt has), so lengths
come from the policy itself, and the reward (positional match) is the real task's.

Arms, each a real `rlflow` run with the same seed, data, staleness and steps; the trainer cuts its
passes by a token budget (``actor.max_tokens_per_microbatch=2048``), so that padding every pass to a
120-token response does not make it, rather than generation, what bounds the run:

- ``between_calls``: a rollout call takes ``groups_per_call`` groups and runs until its longest
  response ends; new weights wait for the next call.
- ``in_flight`` (``:recompute`` or ``:keep``): continuous generation (``roles/in_flight.py``): a group is
  put the moment its last sample ends, finished rows leave the batch and new groups join it, and new
  weights are applied between decode steps.

First, the engine alone (``engine_throughput``, one process, no trainer, the run's tiny model): the same
groups generated in calls of ``groups_per_call`` groups, then continuously (new groups join as a
quarter of the batch frees up, as ``roles/in_flight.py`` feeds them): samples/s and tokens/s. This is
the rollout's own gain, whatever else bounds a whole run.

Then per arm: samples/s and generated tokens/s over the steady span, the trainer's wait for data (seconds
and fraction of its step time), staleness, the share of samples that span two versions, and the
mean reward at the same wall time in every arm (the earliest time every arm reached, over the steps
just before it).

``--part filter`` (also in the default ``all``): dynamic sampling (``data.filter_groups``) on a task
where many groups are all right or all wrong (``FILTER_TASK``), against the same run training every
group: samples generated and trained, the share filtered, wall time, and the reward at the same number
of generated samples. The last line of stdout is one JSON object with every figure.
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


def write_data(path: Path, n: int, sigma: float, longest: int, seed: int = 0) -> dict:
    """Reversal records whose digit counts are log-normal (median 4, spread ``sigma``, at most ``longest``);
    returns their lengths' shape."""
    rng = random.Random(seed)
    digits = [max(1, min(longest, round(rng.lognormvariate(1.4, sigma)))) for _ in range(n)]
    with path.open("w") as f:
        for d in digits:
            s = "".join(rng.choice("0123456789") for _ in range(d))
            f.write(json.dumps({"prompt": s + "=", "answer": s[::-1]}) + "\n")
    ordered = sorted(digits)
    return {"records": n, "digits_median": ordered[n // 2], "digits_p99": ordered[int(n * 0.99)],
            "digits_max": ordered[-1], "digits_mean": round(sum(digits) / n, 2)}


def engine_throughput(model_path: str, data: Path, groups: int, group_size: int, per_call: int, max_new: int) -> dict:
    """The rollout engine alone: ``groups`` groups generated in calls of ``per_call`` groups, then continuously."""
    from collections import deque

    import torch
    import transformers
    from transformers import AutoTokenizer

    from rlflow.engines.base import SamplingParams
    from rlflow.engines.hf import HFRolloutEngine
    from rlflow.roles.config import RolloutConfig

    torch.set_num_threads(1)  # as a rollout replica runs (rollout.threads=1)
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with data.open() as f:
        prompts = [tokenizer(json.loads(line)["prompt"])["input_ids"] for line, _ in zip(f, range(groups))]
    sampling, target = SamplingParams(max_new_tokens=max_new), per_call * group_size
    cfg = RolloutConfig(max_batch=target, group_size=group_size, seed=0)
    out = {}
    engine = HFRolloutEngine(model_path, cfg)
    t0, gens = time.perf_counter(), []
    for i in range(0, len(prompts), per_call):
        gens += engine.generate([p for p in prompts[i:i + per_call] for _ in range(group_size)], sampling)
    out["between_calls"] = (time.perf_counter() - t0, gens)
    engine = HFRolloutEngine(model_path, RolloutConfig(max_batch=target, group_size=group_size, seed=0, update="in_flight"))
    pending, refill = deque(prompts[per_call:]), max(group_size, target // 4)

    def feed(running: int):
        room = target - running
        if room < refill or not pending:
            return None
        return [p for _ in range(min(room // group_size, len(pending))) for p in [pending.popleft()] * group_size]

    t0 = time.perf_counter()
    gens = engine.generate([p for p in prompts[:per_call] for _ in range(group_size)], sampling, between=feed)
    out["continuous"] = (time.perf_counter() - t0, gens)
    figures = {mode: {"seconds": round(t, 2), "samples": len(g), "samples_per_s": round(len(g) / t, 1),
                      "tokens_per_s": round(sum(len(x.response_ids) for x in g) / t, 1),
                      "length_mean": round(sum(len(x.response_ids) for x in g) / len(g), 2),
                      "length_max": max(len(x.response_ids) for x in g)} for mode, (t, g) in out.items()}
    figures["speedup_samples_per_s"] = round(figures["continuous"]["samples_per_s"] / figures["between_calls"]["samples_per_s"], 2)
    return figures


def reward_at(rows: list[dict], t: float, window: int) -> float:
    """Mean reward of the ``window`` steps that ended last at or before ``t`` seconds."""
    before = [r for r in rows if r["time"] <= t][-window:] or rows[:1]
    return round(sum(r["reward/mean"] for r in before) / len(before), 4)


def run(arm: str, steps: int, data: Path, longest: int, extra: list[str], root: Path) -> tuple[dict, list[dict]]:
    update, _, kv = arm.partition(":")
    overrides = [f"data.path={data}", "reward.fn=rlflow.tasks.rewards.positional_match", f"flow.steps={steps}",
                 f"rollout.max_new_tokens={longest + 8}", f"model.tiny.max_positions={2 * longest + 24}",
                 "actor.max_tokens_per_microbatch=2048", f"rollout.update={update}", *extra]
    if kv:
        overrides.append(f"rollout.kv_after_update={kv}")
    rows, summary, wall = run_recipe(root / arm.replace(":", "-"), overrides, f"the {arm} run")
    stats = run_stats(rows, summary, wall)
    stats["model_path"] = summary["model_path"]
    steady = rows[-1]["time"] - rows[0]["time"]
    tokens = sum(r["samples"] * r["response/length_mean"] for r in rows[1:])
    stats.update(arm=arm, tokens_per_s=round(tokens / steady, 1) if steady > 0 else None,
                 response_length_mean=round(sum(r["response/length_mean"] for r in rows) / len(rows), 2),
                 multi_version_frac=round(sum(r.get("rollout/multi_version_frac", 0.0) for r in rows) / len(rows), 3))
    return stats, rows


def updates_part(args, steps: int) -> dict:
    """Between calls vs in flight on the long-tailed task: the engine alone, then whole runs."""
    with tempfile.TemporaryDirectory(prefix="rlflow-long-") as tmp:
        root = Path(tmp)
        shape = write_data(root / "prompts.jsonl", 4000, args.sigma, args.longest)
        print(f"data: {shape}", file=sys.stderr)
        results, curves, engine = [], {}, None
        for arm in args.arms:
            stats, rows = run(arm, steps, root / "prompts.jsonl", args.longest, [f"flow.staleness={args.staleness}", *args.set],
                              root)
            results.append(stats)
            curves[arm] = rows
            print(json.dumps({k: v for k, v in stats.items() if k != "model_path"}), file=sys.stderr)
            if engine is None:  # the model the first run built for this data
                engine = engine_throughput(stats.pop("model_path"), root / "prompts.jsonl", 96, 8, 16, args.longest + 8)
                print(f"engine alone: {json.dumps(engine)}", file=sys.stderr)
            stats.pop("model_path", None)
    equal_t = min(rows[-1]["time"] for rows in curves.values())
    window = max(1, steps // 10)
    for stats in results:
        stats["reward_at_equal_time"] = reward_at(curves[stats["arm"]], equal_t, window)
    base = results[0]
    ratios = {r["arm"]: {"samples_per_s": round(r["samples_per_s"] / base["samples_per_s"], 2),
                         "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 2),
                         "train_s": round(r["train_s"] / base["train_s"], 2)} for r in results[1:]}
    print(f"engine alone, {engine['between_calls']['samples']} samples: between calls "
          f"{engine['between_calls']['samples_per_s']} samples/s, continuous {engine['continuous']['samples_per_s']} "
          f"({engine['speedup_samples_per_s']}x)")
    print(f"{'arm':<16}{'samples/s':>10}{'tokens/s':>10}{'train s':>9}{'wait frac':>10}{'spans 2+':>9}"
          f"{'reward@t':>9}{'final':>7}")
    for r in results:
        print(f"{r['arm']:<16}{r['samples_per_s']:>10}{r['tokens_per_s']:>10}{r['train_s']:>9.1f}"
              f"{r['trainer_wait_frac']:>10}{r['multi_version_frac']:>9}{r['reward_at_equal_time']:>9}{r['reward_final']:>7}")
    return {"staleness": args.staleness, "data": shape, "equal_time_s": round(equal_t, 1), "engine_alone": engine,
            "arms": results, "vs_" + base["arm"]: ratios}


FILTER_TASK = ["reward.fn=rlflow.tasks.rewards.exact_match", "data.min_digits=1", "data.max_digits=4"]
"""Dynamic sampling's task: reversal scored all or nothing, 1 to 4 digits. The warm-started tiny model
reverses short numbers every time and long ones seldom, so many groups are all right or all wrong."""


def reward_at_samples(rows: list[dict], generated: float, window: int) -> float:
    """Mean reward of the ``window`` steps before the step by which ``generated`` samples were generated."""
    total, upto = 0, len(rows)
    for k, r in enumerate(rows):
        total += r["samples"]
        if total >= generated:
            upto = k + 1
            break
    before = rows[max(0, upto - window):upto]
    return round(sum(r["reward/mean"] for r in before) / len(before), 4)


def filter_part(args, steps: int) -> dict:
    """The same run with and without dynamic sampling: reward per generated sample, time, generations."""
    results, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="rlflow-filter-") as tmp:
        for on in (False, True):
            arm = "filter_groups" if on else "every_group"
            rows, summary, wall = run_recipe(Path(tmp) / arm, [*FILTER_TASK, f"flow.steps={steps}",
                                                               f"data.filter_groups={str(on).lower()}", *args.set],
                                             f"the {arm} run")
            stats = run_stats(rows, summary, wall)
            stats.update(arm=arm, generated=sum(r["samples"] for r in rows),
                         trained=sum(r["samples/trained"] for r in rows),
                         filtered_frac=round(sum(r.get("filter/filtered_frac", 0.0) for r in rows) / len(rows), 3),
                         exhausted_steps=sum(r.get("filter/exhausted", 0) for r in rows))
            results.append(stats)
            curves[arm] = rows
            print(json.dumps(stats), file=sys.stderr)
    window = max(1, steps // 10)
    equal = min(r["generated"] for r in results)
    for r in results:
        r["reward_at_equal_generated"] = reward_at_samples(curves[r["arm"]], equal, window)
        r["reward_per_1k_generated"] = round(1000 * (r["reward_final"] - r["reward_start"]) / r["generated"], 4)
    print(f"{'arm':<14}{'generated':>10}{'trained':>9}{'filtered':>9}{'train s':>9}{'reward@n':>9}{'final':>7}")
    for r in results:
        print(f"{r['arm']:<14}{r['generated']:>10}{r['trained']:>9}{r['filtered_frac']:>9}{r['train_s']:>9.1f}"
              f"{r['reward_at_equal_generated']:>9}{r['reward_final']:>7}")
    return {"task": FILTER_TASK, "equal_generated": equal, "arms": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--quick", action="store_true", help="25 steps per arm")
    p.add_argument("--part", choices=["updates", "filter", "all"], default="all")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--sigma", type=float, default=1.0, help="spread of the log-normal digit count")
    p.add_argument("--longest", type=int, default=120, help="most digits of a prompt (and of its answer)")
    p.add_argument("--arms", nargs="+", default=["between_calls", "in_flight", "in_flight:keep"])
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every arm")
    args = p.parse_args()
    steps = 25 if args.quick else args.steps
    out = {"benchmark": "long_generations", "steps": steps}
    if args.part in ("updates", "all"):
        out["updates"] = updates_part(args, steps)
    if args.part in ("filter", "all"):
        out["dynamic_sampling"] = filter_part(args, steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
