"""``rlflow eval CHECKPOINT``: a policy's pass@1, pass@k and mean reward on held-out prompts, with 95% intervals.

    rlflow eval runs/X/checkpoints/final                          # the run's own task, reward and sampling
    rlflow eval CKPT --data test.jsonl --reward rlflow.tasks.rewards.math_answer --samples 8 --k 1 8
    rlflow eval CKPT --task sort --prompts 200 --out eval.json

Design decisions:
- The run's own settings by default. A checkpoint inside a run directory (``RUN_DIR/checkpoints/NAME``)
  is scored on that run's task or data, reward function, chat template and sampling (temperature, top-p,
  top-k, max_new_tokens), read from its ``config.yaml``; flags override each. Elsewhere the defaults
  are rlflow's (the built-in ``reverse`` task).
- Held out: a built-in task's prompts come from its generator seeded with ``--seed`` (not the run's
  ``data.seed``, so not the training stream); a file's are its first ``--prompts`` records in order.
- Any checkpoint: a ``from_pretrained`` directory, a LoRA one (the base with the adapters applied as the
  trainer held them, unmerged), or a sharded one (exported to a temporary directory first).
- Generation is the hf rollout engine's (``engines/hf.py``), seeded: each prompt's ``--samples``
  responses in a row, all in one ``generate`` call, so the same command gives the same numbers.
- Rewards are the reward role's: the decoded response (special tokens skipped) and the record's fields,
  through ``roles/sandbox.call``; a failed reward scores 0 and is counted (``reward/errors``).
- A sample passes when its reward is at least ``--threshold`` (1.0: fully correct). pass@k is the unbiased
  estimator over each prompt's n samples with c passing, 1 - C(n-c, k) / C(n, k) (Chen et al., 2021),
  averaged over prompts; every interval is the mean over prompts ± 1.96 standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PASS_THRESHOLD = 1.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them passing, passes)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, not {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% normal interval) of per-prompt values."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None  # no interval from one prompt
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, 1.96 * math.sqrt(var / len(values))


def summarize(rewards: list[list[float]], ks: list[int], threshold: float = PASS_THRESHOLD) -> dict:
    """The figures of per-prompt reward lists (every prompt the same number of samples)."""
    n = len(rewards[0])
    out = {"prompts": len(rewards), "samples_per_prompt": n, "threshold": threshold}
    mean, half = mean_interval([sum(r) / n for r in rewards])
    out["reward/mean"], out["reward/mean_ci95"] = mean, half
    for k in ks:
        mean, half = mean_interval([pass_at_k(n, sum(x >= threshold for x in r), k) for r in rewards])
        out[f"pass@{k}"], out[f"pass@{k}_ci95"] = mean, half
    return out


@dataclass
class Policy:
    """What to load: a ``from_pretrained`` directory, and with LoRA the adapters to put on it."""

    path: str
    lora: object | None = None  # engines.config.LoraConfig of the adapters
    adapter: str | None = None  # the adapter directory (peft's files)
    cleanup: str | None = None  # a temporary export to remove after


def resolve_policy(checkpoint: str, base: str | None = None) -> Policy:
    """How to load ``checkpoint`` (see the module docstring); a ValueError says what is missing."""
    from rlflow.train.checkpoint import ADAPTER, export, is_adapter, is_sharded, lora_base

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"{checkpoint}: no such checkpoint directory")
    if is_adapter(ckpt):
        from rlflow.engines.lora import read_config

        return Policy(lora_base(ckpt, base), read_config(ckpt / ADAPTER), str(ckpt / ADAPTER))
    if is_sharded(ckpt) and not (ckpt / "model.safetensors").is_file() and not list(ckpt.glob("model-*.safetensors")):
        tmp = tempfile.mkdtemp(prefix="rlflow-eval-")
        export(ckpt, f"{tmp}/model")
        return Policy(f"{tmp}/model", cleanup=tmp)
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"{checkpoint} holds no config.json: give a checkpoint directory (RUN_DIR/checkpoints/NAME) "
                         f"or a from_pretrained model directory")
    return Policy(str(ckpt))


def run_settings(checkpoint: str):
    """The RunConfig of the run ``checkpoint`` belongs to (its ``config.yaml``), or rlflow's defaults."""
    from omegaconf import OmegaConf

    from rlflow.flow.config import RunConfig

    saved = Path(checkpoint).resolve().parent.parent / "config.yaml"
    schema = OmegaConf.structured(RunConfig)
    schema.run_dir = "unused"  # its default resolves the time through Hydra, which is not running here
    if not saved.is_file():
        return OmegaConf.to_object(schema), None
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(saved))
        return OmegaConf.to_object(merged), str(saved)
    except Exception as e:  # noqa: BLE001 - an older rlflow's file: say which, and how to go on without it
        raise ValueError(f"{saved} (the run's settings) does not load in this rlflow ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}): copy the checkpoint out of the run directory and give "
                         f"--task or --data, and --reward") from None


def held_out_records(cfg, prompts: int, seed: int) -> list[dict]:
    """``prompts`` records: the built-in task's generator seeded with ``seed``, or the file's first ones."""
    from rlflow.flow.data import load_prompts
    from rlflow.tasks.builtin import get_task

    loaded = load_prompts(cfg.data)
    if loaded is None:
        task, rng = get_task(cfg.data.task), random.Random(seed)
        return [task.make(rng, cfg.data.min_digits, cfg.data.max_digits) for _ in range(prompts)]
    return loaded.records[:prompts]


def evaluate(policy: Policy, records: list[dict], tokenize, reward_fn, samples: int, sampling, device: str,
             dtype: str, seed: int, decode, progress=None) -> tuple[list[list[float]], int]:
    """(each record's ``samples`` rewards in order, how many reward calls failed); see the module docstring.
    ``progress(done, total)`` is told after each batch of sequences (the engine's ``max_batch``)."""
    from rlflow.roles.config import RolloutConfig

    from rlflow.engines.hf import HFRolloutEngine, load_parameters
    from rlflow.roles.sandbox import call

    engine = HFRolloutEngine(policy.path, RolloutConfig(device=device, dtype=dtype, max_batch=256, seed=seed),
                             policy.lora)
    if policy.adapter is not None:
        from rlflow.engines import lora

        load_parameters(engine.model, lora.load_adapter(policy.adapter))  # copied into the engine's dtype
    prompts = [tokenize(r["prompt"]) for r in records for _ in range(samples)]
    gens = []
    for lo in range(0, len(prompts), engine.max_batch):  # what generate(prompts) does, told batch by batch
        gens += engine.generate(prompts[lo:lo + engine.max_batch], sampling)
        if progress is not None:
            progress(len(gens), len(prompts))
    texts = decode([g.response_ids for g in gens])
    rewards, errors = [], 0
    for i, text in enumerate(texts):
        result = call(reward_fn, text, records[i // samples])
        errors += result[0] != "ok"
        rewards.append(result[1] if result[0] == "ok" else 0.0)
    return [rewards[i:i + samples] for i in range(0, len(rewards), samples)], errors


def main(argv: list[str]) -> int:
    """``rlflow eval CHECKPOINT [...]``: pass@1 / pass@k / mean reward of a checkpoint on held-out prompts."""
    from rlflow.errors import ConfigError
    from rlflow.flow.observe.tracking import make_console, say

    p = argparse.ArgumentParser(prog="rlflow eval", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/NAME, or any from_pretrained model directory")
    p.add_argument("--task", help="a built-in task (reverse, sort, add, ...) instead of the run's")
    p.add_argument("--data", help="a .jsonl or .parquet prompt file instead of the run's (held-out data)")
    p.add_argument("--prompt-key", help="the file's prompt column (default: the run's data.prompt_key)")
    p.add_argument("--split", help="--data is a saved DatasetDict: the split to score (default: the run's data.split)")
    p.add_argument("--reward", help="dotted path of the reward function (default: the run's, or the task's)")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (n of pass@k; default 4)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="pass@k for each k (default: 1 and --samples)")
    p.add_argument("--prompts", type=int, default=64, help="prompts to score (a file's first ones; default 64)")
    p.add_argument("--threshold", type=float, default=PASS_THRESHOLD, help="a sample passes at reward >= this")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the run's rollout.temperature)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's rollout.max_new_tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the run's rollout.dtype")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed, and a built-in task's prompt seed")
    p.add_argument("--base", default=None, help="LoRA: the base model directory, when the adapters' has moved")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    console = make_console()
    try:
        if not Path(args.checkpoint).is_dir():
            raise ValueError(f"{args.checkpoint}: no such checkpoint directory")
        cfg, saved = run_settings(args.checkpoint)
        _override(cfg, args)
        figures = run(args, cfg, console)
    except (ConfigError, ValueError) as e:
        say(console, str(e), "error")
        return 2
    figures["settings_from"] = saved
    _show(console, figures)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 0


def _override(cfg, args) -> None:
    """The flags over the run's settings; then the settings' own checks."""
    d, r = cfg.data, cfg.rollout
    if d.sources and not (args.task or args.data):
        raise ValueError(f"this run's data is a mixture of {[s.name for s in d.sources]} (data.sources), each with its "
                         f"own reward: evaluate one at a time with --task or --data (and --reward)")
    if args.task or args.data:
        d.sources = []
    if args.task:
        d.task, d.path = args.task, None
    if args.data:
        d.path = args.data
    if args.prompt_key:
        d.prompt_key = args.prompt_key
    if args.split:
        d.split = args.split
    if args.reward:
        cfg.reward.fn = args.reward
    if args.temperature is not None:
        r.temperature = args.temperature
    if args.max_new_tokens is not None:
        r.max_new_tokens = args.max_new_tokens
    if args.dtype:
        r.dtype = args.dtype
    if args.samples < 1 or args.prompts < 1:
        raise ValueError(f"--samples and --prompts must be >= 1, got {args.samples} and {args.prompts}")
    if cfg.env.enabled:
        raise ValueError("rlflow eval scores single-turn responses; this run's episodes are multi-turn (env.cls or "
                         "env.agent): evaluate with --task or --data and --reward")
    d.check("data")
    r.check("rollout")


def run(args, cfg, console) -> dict:
    """Load the policy, generate, score, and return the figures."""
    from rlflow.flow.launcher import load_tokenizer, make_tokenize, reward_fn
    from rlflow.plugins import load_object

    ks = sorted(set(args.k or [1, args.samples]))
    if max(ks) > args.samples or min(ks) < 1:
        raise ValueError(f"--k {ks}: each k must be between 1 and --samples ({args.samples})")
    fn_path = reward_fn(cfg)
    fn = load_object(fn_path, "reward.fn")
    policy = resolve_policy(args.checkpoint, args.base)
    try:
        from transformers import AutoTokenizer

        records = held_out_records(cfg, args.prompts, args.seed)
        tokenize = make_tokenize(load_tokenizer(policy.path), cfg.data.chat_template)  # as the feeder does
        decoder = AutoTokenizer.from_pretrained(policy.path)  # as the reward role does
        decode = lambda ids: decoder.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        from rlflow.flow.observe.tracking import say

        say(console, f"eval {args.checkpoint}: {len(records)} prompts x {args.samples} samples, reward {fn_path}")
        shown = lambda done, total: say(console, f"generated {done}/{total}")  # noqa: E731
        rewards, errors = evaluate(policy, records, tokenize, fn, args.samples, cfg.rollout.sampling(), args.device,
                                   cfg.rollout.dtype, args.seed, decode, shown)
    finally:
        if policy.cleanup:
            shutil.rmtree(policy.cleanup, ignore_errors=True)
    figures = summarize(rewards, ks, args.threshold)
    figures.update({"checkpoint": str(args.checkpoint), "reward_fn": fn_path, "reward/errors": errors,
                    "task": cfg.data.task if cfg.data.path is None else None, "data": cfg.data.path,
                    "seed": args.seed, "temperature": cfg.rollout.temperature,
                    "max_new_tokens": cfg.rollout.max_new_tokens})
    return figures


def _show(console, figures: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{figures['checkpoint']}: {figures['prompts']} prompts x {figures['samples_per_prompt']} samples")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("95% interval", justify="right")
    for key in ["reward/mean"] + [k for k in figures if k.startswith("pass@") and not k.endswith("_ci95")]:
        half = figures[f"{key}_ci95"]
        table.add_row(key, f"{figures[key]:.4f}", "n/a (one prompt)" if half is None else f"± {half:.4f}")
    console.print(table)
