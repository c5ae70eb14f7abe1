"""The actor role: whole groups in, one optimizer step per policy version, new weights out.

Loop contract:
- consumes: whole groups with every ``ACTOR_INPUT`` column ready (plus ``ref_logprobs`` with a KL
  term); with a staleness bound only the groups scheduled for the current step (``target_step``)
- produces: policy version v + 1 on the weight channel after each step; a ``metrics`` report per step
  (with the uids it trained and those it consumed without training: the launcher's exactly-once
  ledger); checkpoints every ``checkpoint_every`` steps and at the end (``train/checkpoint.py``: written
  in the background, resumable)
- waits for: groups (bounded by the run's wait_seconds, then an error saying which step it was filling)
- unblocked by: the reward (and reference) role's puts, which complete a group's columns

Streaming: a step does forward/backward on each delivery as it arrives (``StepAccumulator``) and steps
the optimizer once the batch is complete. Losses are accumulated as un-normalised sums and the gradient
is divided by the batch's normaliser at the end, so the step's gradient is the one the whole batch would
give in one pass: with staleness 0 this is synchronous training, not an approximation. Held instead of
streamed (``algo/step.py``): a sharded trainer (``actor.parallel=fsdp``: its ranks run every pass
together) and several optimizer steps per version (``actor.minibatches``, ``actor.epochs``) train the
step's groups once they are all in.

What trains: a sample whose reward failed (NaN) is skipped, and so is a whole group left with fewer
than two scored samples (or, with ``drop_uniform_groups``, one whose rewards are all equal). A step whose
every sample was skipped makes no update: the weights and the optimizer state stay as they are (AdamW
would move weights on a zero gradient through its momentum and weight decay), only the version moves
on, so admission control and the data position are unchanged; its metrics say ``step/updated: 0``.
Dynamic sampling (``data.filter_groups``): a group the criterion refuses is filtered (not trained,
counted in the ledger as filtered) and the step asks the feeder for a replacement (``_fill``), so it
still trains ``groups_per_step`` groups, unless ``data.filter_budget`` runs out.

Exactly-once: a step's rows stay leased until its optimizer step is done and are acked then (leases
held longer than half their term are renewed while the step fills, so none expires under it); the bus
releases a row once the actor acked it, so no sample trains twice.

Resume (``resume_from``): the engine is built from the checkpoint, restores its optimizer state and
version, and the loop goes on from there; the checkpoint's ``groups_by_step`` carries on, so every later
checkpoint still names every group the kept steps consumed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import pyarrow as pa
import torch

from rlflow.roles import schema
from rlflow.train.checkpoint import FINAL, STAGING, Checkpointer, export, holds_model, read_state, restore_rng
from rlflow.roles import reports
from rlflow.roles.config import ActorArgs, ActorConfig, Broadcast
from rlflow.roles.context import RoleContext, shard_endpoint
from rlflow.plugins import load_object
from rlflow.train.data_parallel import TrainerGroup
from rlflow.algo.step import StepAccumulator
from rlflow.engines.base import SamplingParams
from rlflow.sync.codec import DTYPES
from rlflow.sync.config import SyncConfig
from rlflow.sync.weights import WeightPublisher, root_checksum
from rlflow.transfer import BusTimeout


def make_engine(cfg: ActorConfig, model_path: str, sampling: SamplingParams):
    """The train engine, built as ``cls(model_path, cfg, sampling)``: Hugging Face's, or ``actor.engine``'s class.

    ``sampling`` is the rollout's: an engine takes logprobs at its temperature (``engines/base.py``)."""
    if cfg.engine == "hf":
        from rlflow.engines.hf import HFTrainEngine

        cls = HFTrainEngine
    else:
        cls = load_object(cfg.engine, "actor.engine")
    try:
        inspect.signature(cls).bind(model_path, cfg, sampling)
    except TypeError:
        raise TypeError(f"actor.engine={cfg.engine}: a train engine is built as {cls.__name__}(model_path, cfg, "
                        f"sampling), sampling being the rollout's SamplingParams (score logprobs at "
                        f"sampling.temperature; engines/base.py), but {cls.__name__}{inspect.signature(cls)} does "
                        f"not take those arguments") from None
    return cls(model_path, cfg, sampling)


def serve(cfg: ActorConfig, ctx: RoleContext, args: ActorArgs) -> None:
    """Train ``args.steps`` steps, publishing each version; see the module docstring for the contract.

    With ``cfg.replicas`` > 1 (or ``parallel=fsdp``) this is one of the trainer ranks
    (``train/data_parallel.py``): it trains on its share of each step's groups, and rank 0 alone
    publishes, saves and reports. Sharded (fsdp), every pass and every gathering of the model is a
    collective, so all ranks run them: the step's passes once its groups are in (lockstep), and the
    gathering of weights to publish and of state to checkpoint (to rank 0).
    """
    steps, staleness, sync, epoch = args.steps, args.staleness, args.sync, args.epoch
    resume_from, samples_every = args.resume_from, args.samples_every
    torch.manual_seed(cfg.seed)
    sharded = cfg.parallel == "fsdp"
    group = TrainerGroup.join(ctx, cfg.replicas, cfg.device) if cfg.replicas > 1 or sharded else None
    if group is not None:
        cfg = dataclasses.replace(cfg, device=group.device)  # this rank's own GPU
    # a sharded checkpoint's weights are in its dcp/, a LoRA one's adapters in adapter/, which restore loads
    # onto the start model
    engine = make_engine(cfg, resume_from if resume_from is not None and holds_model(resume_from) else ctx.model_path,
                         args.sampling)
    if sharded and not getattr(engine, "sharded", False):
        raise TypeError(f"actor.parallel=fsdp: {type(engine).__name__} does not shard its model (no sharded=True; "
                        f"HFTrainEngine does, engines/fsdp.py): use actor.parallel=replicate")
    if cfg.lora.enabled and not getattr(engine, "lora", False):
        raise TypeError(f"actor.lora.rank={cfg.lora.rank}: {type(engine).__name__} does not train adapters (no "
                        f"lora=True; HFTrainEngine does, engines/lora.py): set actor.lora.rank=0")
    # the data position: group ids each step consumed, the uids it consumed without training, and which
    # of those dynamic sampling dropped
    position = _resume(engine, resume_from) if resume_from else {key: [] for key in POSITION}
    keep_group = load_object(args.filter_fn, "data.filter_fn") if args.filter_fn else None
    if cfg.replicas > 1 and not sharded and not hasattr(engine, "gradients"):
        raise TypeError(f"actor.replicas={cfg.replicas} sums gradients across replicas: {type(engine).__name__} "
                        f"has no gradients() (see engines/base.py)")
    if cfg.minibatches * cfg.epochs > 1 and "advance" not in inspect.signature(engine.step).parameters:
        raise TypeError(f"actor.minibatches={cfg.minibatches} actor.epochs={cfg.epochs} take several optimizer steps "
                        f"per version: {type(engine).__name__}.step needs an advance argument (see engines/base.py)")
    lead = group is None or group.rank == 0
    gather = lead or sharded  # who calls what gathers the model (a collective when sharded)
    shard_sync = args.weight_shards > 1  # every rank publishes its own rows: nothing is gathered to publish
    if shard_sync and not hasattr(engine, "shard_weights"):
        raise TypeError(f"actor.parallel=fsdp publishes each rank's own rows: {type(engine).__name__} has no "
                        f"shard_weights() (see engines/base.py)")
    if shard_sync:
        publication = ShardedPublication(ctx, sync, group, engine)
    else:
        first = engine.weights() if gather else None  # the start version (sharded: gathered to rank 0)
        publication = Publication(ctx, sync, args.broadcast, cfg.device, engine.version, first) if lead else None
    checkpoints = Checkpointer(f"{ctx.run_dir}/checkpoints", cfg.checkpoint_keep) \
        if lead and hasattr(engine, "snapshot") else None
    columns = (schema.EPISODE_ACTOR_INPUT if args.episodes else schema.ACTOR_INPUT) + \
        (["token_versions"] if args.in_flight and not args.episodes else []) + \
        (["data_source"] if args.sources else []) + \
        (["ref_logprobs"] if cfg.kl_coef > 0 else [])
    share = cfg.groups_per_step // cfg.replicas  # validation makes it divide
    ctx.report(reports.READY)
    try:
        while engine.version < steps:
            step, t0 = engine.version, time.monotonic()
            acc = StepAccumulator(engine, cfg, args.sampling.max_new_tokens, lockstep=sharded, ranks=group,
                                  keep_group=keep_group)
            deliveries, waited = _fill(ctx, acc, columns, share, step, staleness, args.filter_budget)
            if group is not None:
                with ctx.timeline.span("all-reduce", step=step + 1):
                    group.merge(acc)
                    if acc.held is None:  # streamed: the gradient is in; held updates reduce their own
                        group.all_reduce_gradients(engine.gradients())
            with ctx.timeline.span("train", step=step + 1, optimizer_step=True):
                metrics = acc.finish()
            for d in deliveries:
                ctx.bus.ack(d)
            for key, value in zip(POSITION, (acc.group_ids, acc.skipped_uids, acc.filtered_uids)):
                position[key].append(value)  # every rank's, in rank order
            sync_metrics, ckpt_metrics = {}, {}
            if shard_sync or lead:
                weights = None if shard_sync else engine.weights()
                with ctx.timeline.span("sync", step=step + 1, version=engine.version) as span:
                    sync_metrics = publication.publish(engine.version, weights)
                    span["bytes"] = sync_metrics.get("sync/bytes")
            elif sharded:
                engine.weights()  # a collective: rank 0 gathers the whole model to publish it
            if gather and cfg.checkpoint_every and engine.version % cfg.checkpoint_every == 0 and engine.version < steps:
                with ctx.timeline.span("checkpoint", step=step + 1):
                    ckpt_metrics = _checkpoint(checkpoints, f"step-{engine.version}", engine, epoch, position, ctx)
            if not lead:
                continue
            elapsed = time.monotonic() - t0
            examples = {"examples": _examples(deliveries[0].table)} if samples_every and (step + 1) % samples_every == 0 else {}
            if keep_group is not None:  # acc.groups: every rank's, merged
                metrics.update(filter_metrics(metrics, acc.groups - cfg.groups_per_step, cfg.groups_per_step))
            ctx.report(reports.METRICS, step=step + 1, **metrics, **{
                "actor/wait_s": waited, "actor/step_s": elapsed, "samples/s": metrics["samples"] / elapsed,
                **sync_metrics, **ckpt_metrics}, uids=acc.trained_uids, skipped_uids=acc.skipped_uids,
                filtered_uids=acc.filtered_uids, **examples,
                **({"group_rewards": acc.group_means} if args.curriculum else {}))
        identical = True
        if group is not None:
            views = engine.gathered_views() if sharded else sorted(engine.weights().items())
            identical = group.identical_weights(views)
        if gather:
            _checkpoint(checkpoints, FINAL, engine, epoch, position, ctx)
        if lead:
            if checkpoints is not None:
                checkpoints.close(ctx.wait_seconds)
                if cfg.lora.enabled and cfg.lora.final == "merged":
                    _merge_final(ctx)
            ctx.report(reports.DONE, version=engine.version, replicas=cfg.replicas, identical_weights=identical)
        else:  # the run ends on rank 0's report; stay until the launcher stops this rank
            time.sleep(ctx.wait_seconds)
    finally:
        if publication is not None:
            publication.close()
        if group is not None:
            group.close()


def _fill(ctx: RoleContext, acc: StepAccumulator, columns: list[str], share: int, step: int,
          staleness: int | None, budget: int = 0) -> tuple[list, float]:
    """Take whole groups until ``acc`` holds this replica's ``share`` of the step, training on each delivery
    as it arrives; returns the deliveries (acked after the optimizer step) and the seconds spent waiting.

    Dynamic sampling (``budget`` > 0): for each group ``acc`` filtered, one replacement is asked of the
    feeder (a ``replace`` report), up to ``budget`` for the step; the step then takes that many more
    groups. Any replica takes any group of the step, so the step's groups and the groups every replica
    waits for always match in number."""
    deliveries, waited, asked = [], 0.0, 0
    while acc.groups < share + asked:
        t = time.monotonic()
        _renew_held(ctx, deliveries)
        with ctx.timeline.span("wait", step=step + 1, groups=acc.groups):
            deliveries.append(_take(ctx, columns, share + asked - acc.groups, step, staleness, acc.groups,
                                    share + asked))
        waited += time.monotonic() - t
        with ctx.timeline.span("train", step=step + 1, samples=len(deliveries[-1])):
            acc.add(deliveries[-1].table)
        more = min(acc.filtered_groups, budget) - asked
        if more > 0:
            ctx.report(reports.REPLACE, step=step, groups=more)
            asked += more
    return deliveries, waited


def filter_metrics(metrics: dict, replaced: int, groups: int) -> dict[str, float]:
    """Dynamic sampling's metrics for a step of ``groups`` groups that asked for ``replaced`` replacements:
    the share of consumed groups it dropped, the extra generations (samples) it cost, and whether its
    budget ran out (it trained fewer groups than ``groups``)."""
    consumed = groups + replaced
    filtered = metrics["filter/groups"]
    return {"filter/filtered_frac": filtered / consumed, "filter/replacements": replaced,
            "filter/extra_samples": metrics["samples"] * replaced / consumed,
            "filter/exhausted": int(consumed - filtered < groups)}


def _examples(table: pa.Table) -> list[dict]:
    """The first group of a delivery as token ids, rewards and versions: a sample of what the step trained."""
    first = table.column("group_id")[0].as_py()
    rows = [i for i, g in enumerate(table.column("group_id").to_pylist()) if g == first]
    pick = table.take(rows).select(["prompt_ids", "response_ids", "reward", "version_start"]).to_pylist()
    return [{**r, "reward": None if math.isnan(r["reward"]) else r["reward"]} for r in pick]


POSITION = ("groups_by_step", "skipped_by_step", "filtered_by_step")  # a checkpoint's data position, per step


def _resume(engine, path: str) -> dict[str, list[list[str]]]:
    """Bring ``engine`` (built from checkpoint ``path``) to where it was; returns the checkpoint's data
    position (``POSITION``: group ids per step, the uids each consumed without training, those filtered)."""
    if not hasattr(engine, "restore"):
        raise TypeError(f"resuming needs {type(engine).__name__}.restore(path, version) (see engines/base.py)")
    state = read_state(path)
    engine.restore(path, state["version"])
    restore_rng(path)
    return {key: state.get(key, [[] for _ in state["groups_by_step"]]) for key in POSITION}


def _checkpoint(checkpoints: Checkpointer | None, name: str, engine, epoch: int, position: dict[str, list],
                ctx: RoleContext) -> dict[str, float]:
    """Checkpoint ``name`` in the background; an engine without ``snapshot()`` saves its model only (not resumable).
    Sharded, every rank calls this: the snapshot gathers the state to rank 0 (``checkpoints`` there, None elsewhere)."""
    if not hasattr(engine, "snapshot"):
        engine.save(f"{ctx.run_dir}/checkpoints/{name}")
        return {}
    t0 = time.monotonic()
    if getattr(engine, "sharded", False):  # every rank writes its rows; the final one also exports the model
        write = engine.snapshot(f"{ctx.run_dir}/checkpoints/{name}{STAGING}", whole=name == FINAL)
    else:
        write = engine.snapshot()
    snapshot_s = time.monotonic() - t0
    if checkpoints is None:  # a sharded rank other than 0
        return {}
    state = {"version": engine.version, "epoch": epoch, **{key: list(position[key]) for key in POSITION},
             "time": time.time()}
    return {**checkpoints.save(name, write, state, ctx.wait_seconds), "checkpoint/snapshot_s": snapshot_s}


def _merge_final(ctx: RoleContext) -> None:
    """``actor.lora.final=merged``: the final checkpoint's adapters merged into the base, as ``final/merged``
    (``from_pretrained``). After the checkpoint is whole, so a failed merge (memory, a base that moved)
    costs the merge only; the error says how to run it again."""
    final = f"{ctx.run_dir}/checkpoints/{FINAL}"
    print(f"merging the adapters of {final} into the base model (actor.lora.final=merged)", flush=True)
    t0 = time.monotonic()
    with ctx.timeline.span("merge"):
        try:
            export(final, f"{final}/merged")
        except Exception as e:
            raise RuntimeError(f"merging the final adapters failed ({type(e).__name__}: {e}); the checkpoint {final} is "
                               f"whole: merge it with `rlflow export {final} OUT_DIR`") from e
    print(f"merged model: {final}/merged ({time.monotonic() - t0:.1f}s)", flush=True)


def _renew_held(ctx: RoleContext, deliveries: list) -> None:
    """Renew the leases of this step's deliveries that are past half their term (a step may fill slowly)."""
    for d in deliveries:
        if time.monotonic() - d.leased_at > ctx.lease_seconds / 2:
            ctx.bus.renew(d, lease=ctx.lease_seconds)


class Publication:
    """Where each new version goes (replica 0 only): the weight channel, and first, with sglang's
    update=distributed, every rollout server (so a server holds a version before the feeder, which reads
    versions off the channel, can admit groups for it)."""

    def __init__(self, ctx: RoleContext, sync: SyncConfig, broadcast: Broadcast | None, device: str,
                 version: int, weights: dict[str, torch.Tensor]):
        """Open the channel and publish the start ``version``'s ``weights``."""
        self.sync, self.device = sync, device
        self.servers = self.channel = None
        try:
            if broadcast is not None:
                self.servers = _broadcaster(ctx, broadcast)
                self.servers.push(self._rollout_dtype(weights), version, device)
            self.channel = WeightPublisher(ctx.endpoints.bind_address("weights"), sync, DTYPES[sync.dtype],
                                           ctx.keys_dir, key=ctx.channel_key)
            ctx.endpoints.advertise("weights", self.channel.address)
            self.channel.publish(version, weights)
        except BaseException:
            self.close()
            raise

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> dict:
        """Publish ``version``; returns its ``sync/*`` metrics."""
        extra = {}
        if self.servers is not None:
            extra["sync/broadcast_s"] = self.servers.push(self._rollout_dtype(weights), version, self.device)
        return {**self.channel.publish(version, weights), **extra}

    def _rollout_dtype(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = DTYPES[self.sync.dtype]
        return {k: v.to(dtype) for k, v in weights.items()}

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.servers is not None:
            self.servers.close()


class ShardedPublication:
    """Every rank of a sharded trainer publishes its own rows (``engines/fsdp.local_rows``) on a channel of
    its own: endpoint ``weights`` for rank 0 (the one the feeder reads versions off), ``weights.<r>``
    for rank r. No rank gathers the model, and each rank's bytes travel its own relay chain.

    The ranks agree on each publication, so rollouts can assemble a version from every rank's channel:
    a keyframe when any rank wants one (so every channel cuts keyframes at the same versions), and the
    root checksum over every rank's (``sync/weights.root_checksum``), which every signed head carries
    with the rank's rows and the whole shapes. ``publish`` is a collective every rank calls; rank 0
    gets the metrics of all (bytes summed, the slowest rank's encode time)."""

    def __init__(self, ctx: RoleContext, sync: SyncConfig, group, engine):
        self.group, self.engine, self.sync = group, engine, sync
        name = shard_endpoint("weights", group.rank)
        self.channel = WeightPublisher(ctx.endpoints.bind_address(name), sync, DTYPES[sync.dtype], ctx.keys_dir,
                                       key=ctx.channel_key)
        try:
            ctx.endpoints.advertise(name, self.channel.address)
            self.publish(engine.version)
        except BaseException:
            self.close()
            raise

    def publish(self, version: int, weights=None) -> dict:
        """Publish this rank's rows as ``version`` (``weights``: unused, the rows are the engine's own)."""
        local, rows, shapes = self.engine.shard_weights()
        pending = self.channel.encode(version, local)
        agreed = self.group.gather((pending["checksum"], pending["wants_keyframe"]))
        meta = {"shard": self.group.rank, "shards": self.group.world, "rows": rows, "shapes": shapes,
                "dtype": self.sync.dtype, "root": root_checksum([c for c, _ in agreed])}
        metrics = self.group.gather(self.channel.send(pending, any(w for _, w in agreed), meta))
        out = {k: sum(m[k] for m in metrics) for k in ("sync/bytes", "sync/dense_bytes", "sync/int32_bytes")}
        out["sync/density"] = sum(m["sync/density"] * m["sync/dense_bytes"] for m in metrics) / max(out["sync/dense_bytes"], 1)
        out["sync/keyframe"] = metrics[0]["sync/keyframe"]
        out["sync/encode_s"] = max(m["sync/encode_s"] for m in metrics)
        return out

    def close(self) -> None:
        self.channel.close()


def _broadcaster(ctx: RoleContext, broadcast: Broadcast):
    """Connect to every rollout replica's sglang server (endpoints ``sglang-<i>``) in one process group."""
    from rlflow.engines.sglang import WeightBroadcaster

    urls = [ctx.endpoints.lookup(f"sglang-{i}", ctx.wait_seconds) for i in range(broadcast.servers)]
    address = ctx.endpoints.bind_address("trainer-broadcast")
    host = address[len("tcp://"):].rpartition(":")[0] if address.startswith("tcp://") else "127.0.0.1"
    return WeightBroadcaster(urls, [broadcast.tp] * len(urls), host, broadcast.backend, broadcast.sglang,
                             ctx.wait_seconds)


def _take(ctx: RoleContext, columns, n: int, step: int, staleness: int | None, have: int, want: int):
    where = None if staleness is None else [("target_step", "==", step)]
    try:
        d = ctx.bus.get("actor", columns, n=n, min_n=1, groups=True, where=where, timeout=ctx.wait_seconds,
                        lease=ctx.lease_seconds)
        schema.refuse_out_of_range(d, ctx.bounds)
        return d
    except BusTimeout as e:
        raise BusTimeout(f"the actor waited {ctx.wait_seconds:.0f}s for the groups of step {step} "
                         f"({have} of {want} in hand): are the rollout and reward roles alive and keeping up? ({e})") from e
