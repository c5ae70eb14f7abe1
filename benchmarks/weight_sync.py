"""SparseRL-Sync on a model of realistic shape: patch density and size, bit-exactness, speed, dissemination.

    python -m benchmarks.weight_sync                # ~100M-parameter Qwen2-shaped model, 20 steps per lr
    python -m benchmarks.weight_sync --quick        # ~10M parameters, 5 steps, one lr, small objects
    python -m benchmarks.weight_sync --steps 100 --lrs 1e-6 --no-dissemination   # the steady state

Part 1, patches. A Qwen2-shaped causal LM (random init, std 0.02, as ``from_pretrained`` would build
it) keeps fp32 master weights and trains with AdamW (grad-norm clip 1.0) on a GRPO-shaped loss: sampled
responses of random tokens, group-normalised random advantages, -A * log pi(y). That is what RL
gradients look like (noisy, zero-mean), which matters: Adam's step size, hence the density, depends on
the gradient's noise. Per step and per learning rate (1e-6, 1e-5, 1e-4) the actor's encoder diffs the
bf16 cast against the last published image and a replica applies the patch to its own bf16 tensors:
- density (changed elements / all) and bytes against dense bf16: as sent with the default
  ``values="xor"`` (new XOR old bits; Elias-Fano indices; shuffled, zstd) and with ``values="new"`` (the
  new values), before the byte compressor ("raw": Elias-Fano indices + values, the same size for both
  forms), and with flat int32 indices + values (the paper's raw form);
- bit-exact: the replica's checksum verified by ``apply``, and an independent comparison of every
  tensor's bits with a fresh cast of the master weights (both replicas, both value forms);
- encode and apply time against the dense path (cast + safetensors save; safetensors load + copy).

Part 2, dissemination. Replicas are separate processes running ``transfer.relay.Relay``; every node's
uplink is paced to the same bandwidth (on one host, unpaced loopback measures memcpy, not a network;
pacing each sender reproduces the ECHO-2 setting where each node has one link). The time from
publication to the last replica holding the object, for 1, 2 and 4 replicas, as a chain (each replica
pulls from the previous one) and direct (every replica pulls from the publisher). Model:
chain ~ (M / b)(1 + (N - 1) / K) for K chunks, direct ~ N * M / b. Median of ``--repeats`` runs.

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import torch

from rlflow.sync.codec import PatchEncoder, apply, checksum, read_header


def build_model(quick: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if quick:
        cfg = Qwen2Config(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def grpo_step(model, optimizer, gen: torch.Generator, groups: int = 2, group_size: int = 4, length: int = 32) -> float:
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (groups, length), generator=gen).repeat_interleave(group_size, 0)
    responses = torch.randint(0, vocab, (groups * group_size, length), generator=gen)
    rewards = torch.rand(groups, group_size, generator=gen)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1)
    ids = torch.cat([prompts, responses], 1)
    logits = model(input_ids=ids).logits[:, length - 1: -1].float()  # [B, T, V]
    logp = torch.log_softmax(logits, -1).gather(-1, responses[:, :, None]).squeeze(-1)  # [B, T]
    loss = -(adv[:, None] * logp).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def dense_roundtrip(weights: dict[str, torch.Tensor], replica: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """The dense path for comparison: cast + safetensors bytes; load + copy into the replica."""
    from safetensors.torch import load, save

    t0 = time.perf_counter()
    data = save({k: v.detach().to(torch.bfloat16) for k, v in weights.items()})
    t1 = time.perf_counter()
    for k, v in load(data).items():
        replica[k].copy_(v)
    return t1 - t0, time.perf_counter() - t1, len(data)


def patches(lr: float, steps: int, quick: bool) -> dict:
    model = build_model(quick)
    weights = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    encoder, xor_encoder = PatchEncoder(torch.bfloat16, values="new"), PatchEncoder(torch.bfloat16, values="xor")
    replica = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in weights.items()}
    xor_replica = {k: torch.empty(v.shape, dtype=torch.bfloat16) for k, v in weights.items()}
    apply(encoder.snapshot(0, weights), replica, base=None)
    apply(xor_encoder.snapshot(0, weights), xor_replica, base=None)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        grpo_step(model, optimizer, gen)
        train_s = time.perf_counter() - t0
        blob, stats = encoder.patch(step, weights)
        header, start = read_header(blob)
        t0 = time.perf_counter()
        apply(blob, replica, base=step - 1, base_checksum=rows[-1]["checksum"] if rows else None)
        apply_s = time.perf_counter() - t0
        xor_base = xor_encoder.checksum
        xor_blob, xor_stats = xor_encoder.patch(step, weights)
        t0 = time.perf_counter()
        apply(xor_blob, xor_replica, base=step - 1, base_checksum=xor_base)
        xor_apply_s = time.perf_counter() - t0
        exact = all(torch.equal(r[k].view(torch.int16), v.detach().to(torch.bfloat16).view(torch.int16))
                    for k, v in weights.items() for r in (replica, xor_replica))
        dense_encode_s, dense_apply_s, dense_bytes = dense_roundtrip(weights, {k: v.clone() for k, v in replica.items()})
        rows.append({"step": step, "density": stats["density"], "new_bytes": stats["bytes"],
                     "raw_bytes": start + sum(s[2] for s in header["sections"].values()),
                     "int32_bytes": stats["int32_bytes"], "dense_bytes": stats["dense_bytes"],
                     "bit_exact": exact and checksum(replica) == header["checksum"], "checksum": header["checksum"],
                     "encode_s": stats["encode_s"], "apply_s": apply_s, "train_s": train_s,
                     "xor_bytes": xor_stats["bytes"], "xor_encode_s": xor_stats["encode_s"], "xor_apply_s": xor_apply_s,
                     "dense_encode_s": dense_encode_s, "dense_apply_s": dense_apply_s,
                     "dense_safetensors_bytes": dense_bytes})
        dense = stats["dense_bytes"]
        print(f"lr {lr:g} step {step}: density {stats['density']:.4%}, {xor_stats['bytes'] / 1e6:.2f} MB "
              f"({dense / xor_stats['bytes']:.0f}x smaller than dense bf16; new values {dense / stats['bytes']:.0f}x, "
              f"raw {dense / rows[-1]['raw_bytes']:.0f}x), "
              f"encode {stats['encode_s']:.2f}s apply {apply_s:.2f}s, bit-exact {rows[-1]['bit_exact']}",
              file=sys.stderr, flush=True)
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    def mean(key, part=rows):
        return statistics.fmean(r[key] for r in part)

    late = rows[len(rows) // 2:]  # past Adam's first steps, whose update is lr * sign(g) everywhere
    dense = rows[0]["dense_bytes"]
    out = {"steps": len(rows), "dense_bytes": dense, "density": [round(r["density"], 6) for r in rows],
           "per_step_ratio": {k: [round(dense / r[f"{k}_bytes"], 1) for r in rows] for k in ("xor", "new", "raw")},
           "bit_exact_fraction": sum(r["bit_exact"] for r in rows) / len(rows)}
    for name, part in (("all", rows), ("second_half", late)):
        out[name] = {  # ratios of total dense bytes to total patch bytes over the part
            "density_mean": round(mean("density", part), 6),
            "bytes_mean": round(mean("xor_bytes", part)),
            "ratio_compressed_xor": round(dense / mean("xor_bytes", part), 1),
            "ratio_compressed_new": round(dense / mean("new_bytes", part), 1),
            "ratio_raw": round(dense / mean("raw_bytes", part), 1),
            "ratio_raw_int32": round(dense / mean("int32_bytes", part), 1),
            "encode_s": round(mean("encode_s", part), 4), "apply_s": round(mean("apply_s", part), 4),
            "xor_encode_s": round(mean("xor_encode_s", part), 4), "xor_apply_s": round(mean("xor_apply_s", part), 4),
            "dense_encode_s": round(mean("dense_encode_s", part), 4),
            "dense_apply_s": round(mean("dense_apply_s", part), 4),
        }
    out["train_step_s"] = round(mean("train_s"), 3)
    return out


# ---------------------------------------------------------------- part 2: dissemination
def _replica(root: str, upstream: str | None, serve: str | None, key: str, rate: float, ready, done,
             secret: bytes) -> None:
    from rlflow.transfer.channel import ChannelKey
    from rlflow.transfer.relay import Relay

    relay = Relay(root, upstream, serve, uplink_bytes_per_s=rate, hop_timeout=60, key=ChannelKey(secret))
    ready.put(os.getpid())
    relay.head(-1, timeout=120)
    relay.fetch(key, timeout=300)
    done.put(time.time())
    time.sleep(3600)  # keep serving peers until the benchmark kills it


def disseminate(num: int, chain: bool, size: int, chunk: int, rate: float, sock_dir: str, tag: str) -> float:
    from rlflow.transfer.channel import ChannelKey, Publisher

    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    secret = os.urandom(32)  # keyed, signed heads, as in a run
    pub = Publisher(f"ipc://{sock_dir}/{tag}-root", chunk_bytes=chunk, uplink_bytes_per_s=rate, key=ChannelKey(secret))
    procs = []
    try:
        for i in range(num):
            upstream = f"ipc://{sock_dir}/{tag}-{i - 1}" if chain and i > 0 else None
            serve = f"ipc://{sock_dir}/{tag}-{i}" if chain and i < num - 1 else None
            procs.append(ctx.Process(target=_replica, args=(pub.address, upstream, serve, "blob", rate, ready, done, secret),
                                     daemon=True))
            procs[-1].start()
        for _ in procs:
            ready.get(timeout=120)
        time.sleep(0.5)  # connections settle (ZeroMQ connects asynchronously)
        data = os.urandom(size)
        t0 = time.time()
        pub.publish(0, {"blob": data})
        return max(done.get(timeout=600) for _ in procs) - t0
    finally:
        for p in procs:
            p.kill()
            p.join()
        pub.close()


def dissemination(quick: bool, repeats: int) -> dict:
    size, chunk, rate = ((16 << 20), (256 << 10), 50e6) if quick else ((128 << 20), (1 << 20), 100e6)
    out = {"object_bytes": size, "chunk_bytes": chunk, "uplink_bytes_per_s": rate, "one_transfer_s": size / rate}
    with tempfile.TemporaryDirectory(prefix="rlflow-bench-") as sock_dir:
        for mode in ("chain", "direct"):
            for num in (1, 2, 4):
                times = [disseminate(num, mode == "chain", size, chunk, rate, sock_dir, f"{mode}{num}{r}")
                         for r in range(repeats)]
                out[f"{mode}_{num}_s"] = round(statistics.median(times), 3)
                print(f"{mode} to {num}: {out[f'{mode}_{num}_s']:.2f}s (runs {[round(t, 2) for t in times]})",
                      file=sys.stderr, flush=True)
    for mode in ("chain", "direct"):
        out[f"{mode}_4_vs_1"] = round(out[f"{mode}_4_s"] / out[f"{mode}_1_s"], 2)
    k = size // chunk
    out["chain_4_model_s"] = round(size / rate * (1 + 3 / k), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~10M parameters, 5 steps at lr 1e-6, small objects")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per learning rate (default 20)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (default 1e-6 1e-5 1e-4)")
    parser.add_argument("--repeats", type=int, default=3, help="dissemination runs per cell (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-dissemination", dest="dissemination", action="store_false",
                        help="patches only (part 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (5 if args.quick else 20)
    lrs = args.lrs or ([1e-6] if args.quick else [1e-6, 1e-5, 1e-4])
    model = build_model(args.quick)
    result = {"benchmark": "weight_sync", "params": sum(p.numel() for p in model.parameters()), "quick": args.quick, "optimizer": "AdamW",
              "loss": "grpo-shaped surrogate on random tokens", "patches": {}}
    del model
    for lr in lrs:
        result["patches"][f"{lr:g}"] = patches(lr, steps, args.quick)
    if args.dissemination:
        result["dissemination"] = dissemination(args.quick, 1 if args.quick else args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
