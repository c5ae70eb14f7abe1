"""The rollout role: prompt rows in, sampled responses with per-token logprobs and policy versions out.

Loop contract (one replica; several replicas share the work through the bus):
- consumes: rows with ``prompt_ids`` and ``min_version`` (whole groups, up to ``groups_per_call``); with an
  environment (``env.cls``) each row is a multi-turn episode instead: ``roles/episodes.py``
- produces: ``response_ids``, ``rollout_logprobs``, ``version_start``, ``version_end``, ``finish_reason``
- waits for: prompt rows (idle is normal: with staleness 0 the rollouts wait while the actor trains);
  weights of at least ``min_version`` (bounded by the run's wait_seconds, then an error naming it)
- unblocked by: the feeder's puts; the actor's weight publications

Weights (``sync/weights.py``): before every call the newest version is applied if its patch is already
here (it is prefetched, and relayed to peer replicas, while the engine generates); the replica waits
only when a delivery needs a newer version than it holds. A replica generates only at a verified
version. With ``rollout.update=between_calls`` a call runs at one version (``version_start ==
version_end``). With ``in_flight`` the same check runs between decode steps (``roles/in_flight.py``), so a
long response's later tokens come from newer weights; each row then carries ``token_versions``, and
``version_start`` is its oldest token's. Versions only grow during a call and the call started at
``min_version`` or later, so the staleness bound holds for every token.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext

from rlflow.roles import schema
from rlflow.roles import reports
from rlflow.roles.context import RoleContext, ack_work, next_rows, shard_endpoint
from rlflow.plugins import load_object
from rlflow.roles.config import RolloutArgs, RolloutConfig
from rlflow.sync.weights import ShardedWeightReceiver, WeightReceiver


def make_engine(cfg: RolloutConfig, model_path: str, lora=None):
    """The rollout engine, built as ``cls(model_path, cfg)``; with LoRA (``lora``: the run's ``actor.lora``)
    as ``cls(model_path, cfg, lora)``, and the weights it is given are then the adapters only."""
    if cfg.engine == "hf":
        from rlflow.engines.hf import HFRolloutEngine as cls
    elif cfg.engine == "sglang":
        from rlflow.engines.sglang import SGLangEngine as cls
    else:
        cls = load_object(cfg.engine, "rollout.engine")
    if cfg.update == "in_flight" and "between" not in inspect.signature(cls.generate).parameters:
        raise TypeError(f"rollout.update=in_flight applies weights between decode steps, through the engine's "
                        f"generate(prompts, sampling, between=...) (engines/base.py): {cls.__name__}.generate"
                        f"{inspect.signature(cls.generate)} takes no between; set rollout.update=between_calls")
    if lora is None:
        return cls(model_path, cfg)
    try:
        inspect.signature(cls).bind(model_path, cfg, lora)
    except TypeError:
        raise TypeError(f"actor.lora.rank={lora.rank}: the rollout engine applies the trainer's adapters, so it is "
                        f"built as {cls.__name__}(model_path, cfg, lora) (engines/base.py), but "
                        f"{cls.__name__}{inspect.signature(cls)} takes no lora; set actor.lora.rank=0") from None
    return cls(model_path, cfg, lora)


def serve(cfg: RolloutConfig, ctx: RoleContext, args: RolloutArgs) -> None:
    """Generate for prompts off the bus, always at a verified weight version.

    An engine whose weights the trainer installs itself (``follows_trainer``: sglang with
    update=distributed) takes no patches: the replica advertises its server as ``sglang-<replica>``,
    waits for the server to reach the version a delivery needs, and records each sample's own version.
    """
    sync, upstream, relay = args.sync, args.upstream, args.relay
    engine = make_engine(cfg, ctx.model_path, args.lora)
    ep, weights = ctx.endpoints, None
    follows = getattr(engine, "follows_trainer", False)
    if follows:
        ep.advertise(f"sglang-{ctx.replica}", engine.client.url)
    elif args.weight_shards > 1:  # a sharded trainer: a channel per rank, each relayed on its own
        shards = range(args.weight_shards)
        weights = ShardedWeightReceiver(
            [ep.lookup(shard_endpoint("weights", r), ctx.wait_seconds) for r in shards], sync,
            [ep.lookup(shard_endpoint(upstream, r), ctx.wait_seconds) if upstream else None for r in shards],
            [ep.bind_address(shard_endpoint(relay, r)) if relay else None for r in shards],
            fetch_timeout=ctx.wait_seconds, keys_dir=ctx.keys_dir, key=ctx.channel_key)
        if relay:
            for r, rx in zip(shards, weights.shards):
                ep.advertise(shard_endpoint(relay, r), rx.address)
    else:
        weights = WeightReceiver(ep.lookup("weights", ctx.wait_seconds), sync,
                                 ep.lookup(upstream, ctx.wait_seconds) if upstream else None,
                                 ep.bind_address(relay) if relay else None, fetch_timeout=ctx.wait_seconds,
                                 keys_dir=ctx.keys_dir, key=ctx.channel_key)
        if relay:
            ep.advertise(relay, weights.address)
    def synced(need: int | None = None) -> None:
        """Apply the newest weights without waiting (``need`` None), or wait for version ``need``. A patch
        refused on the way leaves the weights unverified: then it waits for a verified version (at least
        the one the engine held), so no token is ever sampled from weights that failed their checksum."""
        if follows:
            if need is not None:
                engine.wait_version(need, ctx.wait_seconds)
            return
        if need is None:
            _synced(ctx, weights, engine)
            if weights.version is not None:
                return
            need = engine.version
        if weights.version is None or weights.version < need:
            _synced(ctx, weights, engine, need)

    try:
        if args.env is not None and args.env.enabled:  # multi-turn episodes: roles/episodes.py
            from rlflow.roles.episodes import serve_episodes

            return serve_episodes(cfg, args.env, ctx, engine, synced, args.chat_template)
        if cfg.update == "in_flight":  # continuous generation, weights applied mid-sequence
            from rlflow.roles.in_flight import serve_in_flight

            return serve_in_flight(cfg, ctx, engine, synced)
        _serve_calls(cfg, ctx, engine, synced)
    finally:
        if weights is not None:
            weights.close()


def _serve_calls(cfg: RolloutConfig, ctx: RoleContext, engine, synced) -> None:
    """rollout.update=between_calls: take up to ``groups_per_call`` groups, generate them in one call at
    one version, put them, ack."""
    sampling = cfg.sampling()
    ctx.report(reports.READY)
    while True:
        synced()
        d = next_rows(ctx, "rollout", schema.ROLLOUT_INPUT, cfg.groups_per_call, groups=True)
        if d is None:
            continue
        need = max(d.table.column("min_version").to_pylist())
        with ctx.timeline.span("wait", weights=need) if getattr(engine, "follows_trainer", False) else nullcontext():
            synced(need)  # admitted for a version not applied yet
        start, t0 = engine.version, time.monotonic()
        with ctx.timeline.span("generate", samples=len(d), version=start) as span:
            gens = engine.generate(d.table.column("prompt_ids").to_pylist(), sampling)
            span["tokens"] = sum(len(g.response_ids) for g in gens)
        versions = [start if g.version is None else g.version for g in gens]
        ctx.bus.put({"uid": d.uids, "response_ids": [g.response_ids for g in gens],
                     "rollout_logprobs": [g.logprobs for g in gens], "version_start": versions,
                     "version_end": [max(v, engine.version) for v in versions],
                     "finish_reason": [g.finish_reason for g in gens]}, missing="skip")
        ack_work(ctx, d)
        ctx.report(reports.WORK, samples=len(gens), tokens=sum(len(g.response_ids) for g in gens),
                   seconds=time.monotonic() - t0, version=start)


def _synced(ctx: RoleContext, weights: WeightReceiver, engine, need: int | None = None) -> None:
    """Apply the newest weights (waiting for version ``need`` when given); report and time what happened.

    On the timeline the time until the last object was fetched is a ``wait`` when the replica had to
    wait for a version, and the applying is a ``sync``; a call that found nothing new records nothing.
    """
    t0 = time.time()
    applied = weights.update(engine, need, ctx.wait_seconds) if need is not None else weights.update(engine)
    if not applied:
        return
    seconds = time.time() - t0
    applying = min(seconds, sum(r.get("apply_s", 0.0) for r in applied))
    if need is not None:
        ctx.timeline.add("wait", t0, seconds - applying, weights=need)
        t0, seconds = t0 + seconds - applying, applying
    ctx.timeline.add("sync", t0, seconds, version=weights.version, bytes=sum(r["bytes"] for r in applied))
    for r in applied:
        ctx.report(reports.SYNC, **r)
