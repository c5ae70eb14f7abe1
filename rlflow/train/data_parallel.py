"""Trainer ranks (``actor.replicas=N``): one optimizer step from N ranks' groups.

Two ways to hold the model (``actor.parallel``): ``replicate`` (below: each rank a whole copy, gradients
all-reduced) and ``fsdp`` (``engines/fsdp.py``: FSDP2 shards parameters, gradients and optimizer state;
its reduce-scatter takes the place of ``all_reduce_gradients``). Either way the ranks merge their step
statistics here, and with fsdp they first agree how many passes each runs (``most``).

Each replica takes its share of a step's groups from the bus (groups_per_step / N; the bus hands every
group to one replica) and accumulates its un-normalised loss gradient as a single trainer would. Before
the step the replicas sum their gradients (all-reduce) and merge their step statistics (normaliser,
rewards, importance weights, uids), in rank order, so every replica steps the optimizer on exactly the
gradient one trainer would have computed from the whole batch, with the same learning-rate factor.
Same start, same summed gradient, same optimizer: the replicas' weights stay identical, which
``identical_weights`` checks at the end.

Replica 0 is the voice of the group: it alone publishes weights, writes checkpoints and reports metrics.

Rendezvous uses the run's endpoints (``flow/placement/endpoints.py``): replica 0 names a torch.distributed init
address as endpoint ``trainer`` (a file in the run's socket directory on one machine; tcp on its node's
IP on a cluster) and the others look it up. Backend: gloo on CPU, nccl on GPU. Every collective is
bounded by the run's wait_seconds (the process group's timeout).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

from rlflow.algo.step import Chunk

MERGED_LISTS = ("rewards", "staleness", "lengths", "trained_uids", "skipped_uids", "group_ids", "spanned",
                "filtered_uids", "sourced",
                "group_means")
MERGED_SUMS = ("groups", "skipped_groups", "reward_errors", "filtered_groups")


def init_address(address: str) -> str:
    """A torch.distributed init_method for an endpoint address: ipc://P -> file://P, tcp://host:0 -> a free port."""
    if address.startswith("ipc://"):
        return "file://" + address[len("ipc://"):]
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        if port == "0":
            with socket.socket() as s:  # free now; torch binds it a moment later (the usual rendezvous race)
                s.bind((host, 0))
                port = str(s.getsockname()[1])
        return f"tcp://{host}:{port}"
    return address


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: ``cuda`` is GPU r among those the process sees (one GPU per rank on a machine;
    under Ray each sees only its own), any other device as given."""
    if device != "cuda":
        return device
    count = torch.cuda.device_count()
    return f"cuda:{rank % count}" if count > 1 else device


def _chunk_state(chunk) -> dict:
    """What a rank sends of a Chunk: its sums, and its log weights as host copies (an object collective
    unpickles a device tensor onto its sender's device)."""
    return {"loss_sum": chunk.loss_sum, "normaliser": chunk.normaliser, "tokens": chunk.tokens, "sums": chunk.sums,
            "seq_log_w": chunk.log_w().cpu(),
            "token_log_w": torch.cat(chunk.token_log_w).cpu() if chunk.token_log_w else None}


def _merged_chunk(states: list[dict]):
    """Every rank's ``_chunk_state`` as one Chunk: sums added, log weights in rank order."""
    out = Chunk()
    out.loss_sum, out.normaliser, out.tokens = (sum(s[k] for s in states) for k in ("loss_sum", "normaliser", "tokens"))
    out.sums = {k: sum(s["sums"].get(k, 0.0) for s in states) for k in {k for s in states for k in s["sums"]}}
    out.seq_log_w = [s["seq_log_w"] for s in states]
    out.token_log_w = [s["token_log_w"] for s in states if s["token_log_w"] is not None]
    return out


class TrainerGroup:
    """This rank's place among the trainer ranks, and the collectives of one step."""

    def __init__(self, rank: int, world: int, init_method: str, device: str, timeout_s: float):
        """Join the ranks' process group at ``init_method`` (a torch.distributed init address), every
        collective bounded by ``timeout_s``. ``join`` finds the address through a run's endpoints."""
        self.rank, self.world = rank, world
        self.device = rank_device(device, rank)
        dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo", init_method=init_method,
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))

    @classmethod
    def join(cls, ctx, replicas: int, device: str) -> "TrainerGroup":
        """Rank ``ctx.replica`` of ``replicas``: rank 0 advertises the init address as endpoint ``trainer``."""
        if ctx.replica == 0:
            method = init_address(ctx.endpoints.bind_address("trainer"))
            ctx.endpoints.advertise("trainer", method)
        else:
            method = init_address(ctx.endpoints.lookup("trainer", ctx.wait_seconds))
        return cls(ctx.replica, replicas, method, device, ctx.wait_seconds)

    def merge(self, acc) -> None:
        """Give ``acc`` (a StepAccumulator) the whole step's statistics (uids trained and skipped, group ids
        in rank order, its ``total``). One collective."""
        state = {name: getattr(acc, name) for name in MERGED_LISTS + MERGED_SUMS}
        states = self.gather({**state, "total": _chunk_state(acc.total)})
        for name in MERGED_LISTS:
            setattr(acc, name, [x for s in states for x in s[name]])
        for name in MERGED_SUMS:
            setattr(acc, name, sum(s[name] for s in states))
        acc.total = _merged_chunk([s["total"] for s in states])

    def merge_chunk(self, chunk):
        """A held update's ``algo/step.Chunk`` summed over the ranks (its log weights gathered, in rank order)."""
        return _merged_chunk(self.gather(_chunk_state(chunk)))

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (small, picklable), in rank order."""
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def most(self, n: int) -> int:
        """The largest ``n`` of any rank (how many lockstep passes every rank runs this step)."""
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_reduce_gradients(self, grads: list[torch.Tensor]) -> None:
        """Sum ``grads`` over the replicas in place (one flat buffer per dtype and device)."""
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            by_kind.setdefault((g.dtype, g.device), []).append(g)
        for group in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in group:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def identical_weights(self, weights) -> bool:
        """True when every rank holds bit-identical weights: a digest of every tensor's bytes, compared.
        ``weights``: (name, tensor) pairs in name order (a sharded engine's gathered views, one at a time)."""
        import xxhash

        h = xxhash.xxh3_64()
        for name, tensor in weights:
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return len(set(self.gather(h.hexdigest()))) == 1

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
