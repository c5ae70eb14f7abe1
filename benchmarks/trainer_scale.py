"""The trainer at scale: what each rank holds and how long a step takes, for 1, 2 and 4 trainer ranks.

    python -m benchmarks.trainer_scale                    # a ~100M-parameter Qwen2-shaped model, ranks 1 2 4
    python -m benchmarks.trainer_scale --layers 4 --ranks 1 2

The model is built locally (``engines/tiny.py`` with no warm-start), wide and deep enough to be a real
load. One rank is the single trainer (``actor.parallel=replicate``, one process); 2 and 4 ranks are FSDP2
(``actor.parallel=fsdp``) over gloo, each rank a process of its own with the same step's batch split
between them, exactly as the actor loop runs it (``StepAccumulator`` in lockstep, ``TrainerGroup.merge``, ``finish``).

Reported per rank count (rank 0's figures unless said):
- ``state_mb``: parameters + AdamW state this rank holds (its shards), exactly, after a step; the goal
  is ~1/N of the single trainer's (``state_ratio``, against 1/N);
- ``step_peak_mb``: the most resident memory the process reached during a training step (the peak is
  reset before each, so the load's transient and the publishing are left out), for every rank in
  ``step_peak_mb_by_rank``; ``load_peak_mb_by_rank``: the peak while the model was built and sharded
  (sharded, only rank 0 reads the weights; the others build on the meta device);
- ``publish_peak_mb_by_rank``: the same while a version is gathered and (rank 0) encoded;
- ``step_s``: seconds per optimizer step (median of the steps after the first);
- ``gather_s`` / ``encode_s`` / ``patch_mb``: publishing a version along the gathered path: the whole
  model gathered to rank 0, then one sparse patch encoded there (``sync/codec.py``), and its size; and
  ``snapshot_mb``: a full float32 keyframe;
- ``shard_patch_mb`` / ``shard_encode_s`` (2 and 4 ranks, every rank in ``*_by_rank``): the patch of each
  rank's own rows, encoded by that rank with the same codec: what sharded sync sends per rank instead
  of gathering (``roles/actor.ShardedPublication``);
- ``checkpoint_snapshot_s`` / ``checkpoint_write_s``: a resumable checkpoint, what the step waits for
  (one trainer: a host copy of the weights and AdamW state; sharded: staging each rank's rows for DCP)
  and the write that goes on beside training (one trainer: the whole state; sharded: every rank its rows).
- ``lora``: one trainer with LoRA adapters (``actor.lora``, rank ``--lora-rank`` on every projection)
  on the same model: the same figures, where a version's snapshot and patch are the adapters alone,
  and ``patch_ratio`` / ``snapshot_ratio``: its sync bytes per version against the full model's.

Ranks share this machine's cores, so step times of 2 and 4 ranks measure overhead, not speed-up. The last
line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def _status(field: str) -> float:
    """A /proc/self/status memory figure in MB (VmRSS, VmHWM)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def _reset_peak() -> None:
    """Make VmHWM the current resident size, so the next reading is the peak of what runs in between."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args) -> None:
    """One rank: build the engine (sharded when world > 1), time steps, gather, encode; write JSON."""
    import pyarrow as pa
    import torch

    from rlflow.algo.step import StepAccumulator
    from rlflow.engines import fsdp
    from rlflow.engines.base import SamplingParams
    from rlflow.engines.config import LoraConfig
    from rlflow.engines.hf import HFTrainEngine
    from rlflow.roles.config import ActorConfig
    from rlflow.sync.codec import PatchEncoder
    from rlflow.train.data_parallel import TrainerGroup

    torch.set_num_threads(args.threads)
    sharded = args.world > 1
    group = TrainerGroup(args.rank, args.world, f"file://{args.init}", "cpu", args.timeout) if sharded else None
    cfg = ActorConfig(parallel="fsdp" if sharded else "replicate", micro_batch=args.micro_batch,
                      replicas=args.world, groups_per_step=args.world, lora=LoraConfig(rank=args.lora))
    sampling = SamplingParams(max_new_tokens=args.response)
    engine = HFTrainEngine(args.model, cfg, sampling)
    load_peak = _status("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the load's freed host memory back, so RSS is what is held
    # the step's batch, the same whatever the ranks; rank r takes every world-th group
    rows = [i for i in range(args.samples) if (i // 4) % args.world == args.rank]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 200, (args.samples, args.prompt), generator=g).tolist()
    response = torch.randint(10, 200, (args.samples, args.response), generator=g).tolist()
    table = pa.table({"group_id": [f"g{i // 4}" for i in rows], "uid": [f"u{i}" for i in rows],
                      "version_start": [0] * len(rows), "reward": [float(i % 2) for i in rows],
                      "prompt_ids": [prompt[i] for i in rows], "response_ids": [response[i] for i in rows],
                      "rollout_logprobs": [[-5.0] * args.response for _ in rows]})
    encoder = PatchEncoder(torch.float32) if args.rank == 0 else None
    shard = {}
    times, gather_s, patch = [], [], {}
    t = time.perf_counter()
    first = engine.weights()
    gather_s.append(time.perf_counter() - t)
    snapshot_mb = len(encoder.snapshot(0, first)) / 2**20 if encoder else 0.0
    del first
    train_peak, publish_peak = 0.0, 0.0

    def step() -> None:
        acc = StepAccumulator(engine, cfg, args.response, lockstep=sharded, ranks=group)
        acc.add(table)
        if group is not None:
            group.merge(acc)
        acc.finish()

    for _ in range(args.steps):
        if sharded:
            group.barrier()
        _reset_peak()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        train_peak = max(train_peak, _status("VmHWM"))
        _reset_peak()
        t = time.perf_counter()
        weights = engine.weights()
        gather_s.append(time.perf_counter() - t)
        if encoder is not None:
            blob, info = encoder.patch(engine.version, weights)
            patch = {"patch_mb": len(blob) / 2**20, "encode_s": info["encode_s"], "density": info["density"]}
            del blob
        del weights
        publish_peak = max(publish_peak, _status("VmHWM"))

    if sharded:  # what a rank would send if it encoded its own rows (the sharded path), after the peaks above
        own = PatchEncoder(torch.float32)
        own.snapshot(engine.version, {n: fsdp.local(p) for n, p in engine.model.named_parameters()})
        step()
        blob, info = own.patch(engine.version, {n: fsdp.local(p) for n, p in engine.model.named_parameters()})
        shard = {"shard_patch_mb": len(blob) / 2**20, "shard_encode_s": info["encode_s"]}
        del own, blob
    # a checkpoint: what the step waits for (the snapshot: sharded, staging every rank's rows for DCP) and
    # the write that runs beside training (rank 0's writer; sharded, it ends once every rank's rows are written)
    target = f"{os.path.dirname(args.init)}/ckpt-{args.world}-lora{args.lora}"
    t = time.perf_counter()
    write = engine.snapshot(f"{target}.dcp") if sharded else engine.snapshot()
    snapshot_s = time.perf_counter() - t
    t = time.perf_counter()
    if args.rank == 0:
        os.makedirs(target)
    write(target)
    checkpoint = {"checkpoint_snapshot_s": snapshot_s, "checkpoint_write_s": time.perf_counter() - t}
    state = sum(fsdp.local(p).numel() * p.element_size() for p in engine.model.parameters())
    state += sum(fsdp.local(v).numel() * v.element_size() for s in engine.optimizer.state.values()
                 for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    out = {"rank": args.rank, "state_mb": state / 2**20, "trained_params": sum(p.numel() for p in engine.weights().values()), "load_peak_mb": load_peak, "step_peak_mb": train_peak,
           "publish_peak_mb": publish_peak,
           "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "gather_s": statistics.median(gather_s),
           "snapshot_mb": snapshot_mb, "params": sum(p.numel() for p in engine.model.parameters()), **patch,
           **checkpoint, **shard}
    with open(args.out, "w") as f:
        json.dump(out, f)
    if group is not None:
        group.close()


def build_model(args) -> str:
    from rlflow.engines.config import TinyModelConfig
    from rlflow.engines.tiny import build_tiny_model, task_demos

    cfg = TinyModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                          num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 192),
                          max_positions=max(128, args.prompt + args.response), warmup_steps=0)
    return build_tiny_model(cfg, task_demos("reverse", 3, 5), cache_dir=args.cache, log=lambda *_: None)


def run_ranks(args, model: str, world: int, tmp: str, lora: int = 0) -> list[dict]:
    """Start ``world`` rank processes and wait for each one's figures (bounded by --timeout); ``lora``: the
    adapters' rank (0: the whole model trains)."""
    tag = f"{world}-lora{lora}"
    outs = [f"{tmp}/w{tag}-r{r}.json" for r in range(world)]
    base = [sys.executable, "-m", "benchmarks.trainer_scale", "--worker", "--model", model, "--world", str(world),
            "--init", f"{tmp}/init-{tag}", "--threads", str(args.threads), "--samples", str(args.samples),
            "--prompt", str(args.prompt), "--response", str(args.response), "--steps", str(args.steps),
            "--micro-batch", str(args.micro_batch), "--lora", str(lora)]
    procs = [subprocess.Popen(base + ["--rank", str(r), "--out", outs[r]]) for r in range(world)]
    try:
        for p in procs:
            if p.wait(timeout=args.timeout) != 0:
                raise SystemExit(f"a rank of the {world}-rank run failed (exit {p.returncode})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [json.load(open(o)) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16, help="samples per step (groups of 4), split over the ranks")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--cache", default=None, help="model cache directory (default: rlflow's)")
    ap.add_argument("--lora-rank", type=int, default=16, help="the LoRA run's adapter rank (0: no LoRA run)")
    # one rank (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--lora", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    model = build_model(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlflow-trainer-scale-") as tmp:
        for world in args.ranks:
            ranks = run_ranks(args, model, world, tmp)
            lead = ranks[0]
            most = max(r["state_mb"] for r in ranks)
            results[world] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in lead.items() if k != "rank"},
                              "state_mb_max_rank": round(most, 1), "state_ratio": most,
                              "step_peak_mb_by_rank": [round(r["step_peak_mb"]) for r in ranks],
                              "publish_peak_mb_by_rank": [round(r["publish_peak_mb"]) for r in ranks],
                              "load_peak_mb_by_rank": [round(r["load_peak_mb"]) for r in ranks],
                              "shard_patch_mb_by_rank": [round(r.get("shard_patch_mb", 0.0), 1) for r in ranks],
                              "shard_encode_s_by_rank": [round(r.get("shard_encode_s", 0.0), 3) for r in ranks]}
            print(f"{world} rank(s): state {lead['state_mb']:.0f} MB/rank, step peak {lead['step_peak_mb']:.0f} MB "
                  f"(every rank: {results[world]['step_peak_mb_by_rank']}), "
                  f"step {lead['step_s']:.2f} s, gather {lead['gather_s']:.2f} s, patch {lead.get('patch_mb', 0):.1f} MB "
                  f"encoded in {lead.get('encode_s', 0):.2f} s; checkpoint: step waits {lead['checkpoint_snapshot_s']:.2f} s, "
                  f"written in {lead['checkpoint_write_s']:.2f} s", flush=True)
        if args.lora_rank:
            lead = run_ranks(args, model, 1, tmp, args.lora_rank)[0]
            full = results[min(results)]
            lora = {k: round(v, 4) if isinstance(v, float) else v for k, v in lead.items() if k != "rank"}
            lora.update(rank=args.lora_rank, patch_ratio=round(lead["patch_mb"] / full["patch_mb"], 5),
                        snapshot_ratio=round(lead["snapshot_mb"] / full["snapshot_mb"], 5))
            print(f"LoRA r={args.lora_rank}: {lead['trained_params']:,} of {lead['params']:,} parameters train; "
                  f"a version's patch {lead['patch_mb']:.2f} MB ({lora['patch_ratio']:.2%} of the full model's "
                  f"{full['patch_mb']:.1f} MB), keyframe {lead['snapshot_mb']:.2f} MB; state {lead['state_mb']:.0f} MB, "
                  f"step {lead['step_s']:.2f} s", flush=True)
    whole = results[min(results)]["state_mb"] * min(results)
    for world, r in results.items():
        r["state_ratio"] = round(r["state_ratio"] / whole, 4)  # the fullest rank's share of the whole
        r["state_ratio_goal"] = round(1 / world, 4)
        r["state_within_15pct"] = abs(r["state_ratio"] * world - 1) <= 0.15
    print(json.dumps({"benchmark": "trainer_scale", "params": results[min(results)]["params"],
                      "config": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "samples", "prompt",
                                                               "response", "micro_batch", "steps", "threads")},
                      "ranks": results, "lora": lora if args.lora_rank else None}))


if __name__ == "__main__":
    main()
