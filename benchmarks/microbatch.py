"""Token-budget micro-batches: a step's peak memory and time, by how its samples are cut into passes.

    python -m benchmarks.microbatch                        # 32 samples, long-tailed lengths up to 1000 tokens
    python -m benchmarks.microbatch --samples 64 --budget 4096

One step's forward and backward (``StepAccumulator.add`` on one delivery of every group) on the tiny model
built wide and long enough to show activations (``--hidden``, 1024 positions), over the same samples each
time. Each configuration runs in a fresh process, so its peak resident memory is its own:

- ``one pass``: ``actor.micro_batch`` = every sample, padded to the longest;
- ``8 per pass``: ``actor.micro_batch=8``, each pass padded to its longest (samples in arrival order);
- ``token budget``: ``actor.max_tokens_per_microbatch=--budget``, longest first;
- ``padding-free``: the same budget with ``actor.padding_free=true``: each pass one packed row of real
  tokens (on this CPU transformers keeps the samples apart with a block-causal mask; on a GPU with
  flash_attention_2 a varlen kernel needs no mask).

The step's gradient is the same in all four (tests/test_streaming_step.py). Reported per configuration:
the peak memory the step added over the process before it (MB), seconds per step (the second of two
steps), and the passes. The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time


def one(args) -> dict:
    """In a fresh process: build (or find) the model, then time two steps of the given cut."""
    import pyarrow as pa
    import torch

    from rlflow.algo.step import StepAccumulator
    from rlflow.engines.base import SamplingParams
    from rlflow.engines.config import TinyModelConfig
    from rlflow.engines.hf import HFTrainEngine
    from rlflow.engines.tiny import build_tiny_model, task_demos
    from rlflow.roles.config import ActorConfig

    torch.set_num_threads(2)
    model = build_tiny_model(TinyModelConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_heads=4,
                                             max_positions=1024, warmup_steps=0), task_demos("reverse", 3, 5),
                             cache_dir=args.cache, log=lambda *_: None)
    rng = random.Random(0)
    # long-tailed response lengths: most short, a few near the longest
    lengths = [min(args.longest, int(rng.lognormvariate(4.0, 1.0)) + 1) for _ in range(args.samples)]
    lengths[0] = args.longest
    table = pa.table({"group_id": [f"g{i // 4}" for i in range(args.samples)], "uid": [f"u{i}" for i in range(args.samples)],
                      "version_start": [0] * args.samples, "reward": [float(rng.random() < 0.5) for _ in range(args.samples)],
                      "prompt_ids": [[rng.randrange(10, 60) for _ in range(8)] for _ in range(args.samples)],
                      "response_ids": [[rng.randrange(10, 60) for _ in range(n)] for n in lengths],
                      "rollout_logprobs": [[-3.0] * n for n in lengths]})
    cfg = ActorConfig(micro_batch=args.rows, max_tokens_per_microbatch=args.tokens, padding_free=args.packed)
    sampling = SamplingParams(max_new_tokens=args.longest)
    engine = HFTrainEngine(model, cfg, sampling)
    passes, score = [], engine.token_logprobs
    engine.token_logprobs = lambda p, r: passes.append(len(r)) or score(p, r)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(2):
        passes.clear()
        t0 = time.perf_counter()
        StepAccumulator(engine, cfg, args.longest).add(table)
        seconds.append(time.perf_counter() - t0)
        engine.optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_added_mb": round((peak - base) / 1024, 1), "seconds": round(seconds[-1], 3), "passes": len(passes),
            "tokens": sum(lengths) + 8 * args.samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--longest", type=int, default=1000, help="the longest response, in tokens")
    p.add_argument("--budget", type=int, default=4096, help="actor.max_tokens_per_microbatch of the third run")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    cache = tempfile.mkdtemp(prefix="rlflow-bench-mb-")
    common = ["--samples", str(args.samples), "--longest", str(args.longest), "--hidden", str(args.hidden),
              "--cache", cache]
    cuts = {"one pass": ["--rows", str(args.samples)], "8 per pass": ["--rows", "8"],
            "token budget": ["--rows", str(args.samples), "--tokens", str(args.budget)],
            "padding-free": ["--rows", str(args.samples), "--tokens", str(args.budget), "--packed"]}
    out = {}
    for name, extra in cuts.items():
        r = subprocess.run([sys.executable, "-m", "benchmarks.microbatch", "--one", *common, *extra],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return 1
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:>13}: +{out[name]['peak_added_mb']:7.1f} MB peak  {out[name]['seconds']:6.2f} s/step  "
              f"{out[name]['passes']:3d} passes", flush=True)
    out["memory_ratio_budget_vs_one_pass"] = round(out["token budget"]["peak_added_mb"] / max(out["one pass"]["peak_added_mb"], 0.1), 3)
    out["speed_ratio_padding_free_vs_budget"] = round(out["token budget"]["seconds"] / max(out["padding-free"]["seconds"], 1e-6), 3)
    out["settings"] = {"samples": args.samples, "longest": args.longest, "budget": args.budget, "hidden": args.hidden}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
