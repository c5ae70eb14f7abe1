"""The actor role: whole groups in, one optimizer step per policy version, new weights out.

Loop contract:
- consumes: whole groups with every ``ACTOR_INPUT`` column ready (plus ``ref_logprobs`` with a KL
  term); with a staleness bound only the groups scheduled for the current step (``target_step``)
- produces: policy version v + 1 on the weight channel after each step; a ``metrics`` report per step
  (with the uids it trained and those it consumed without training: the launcher's exactly-once
  ledger); checkpoints every ``checkpoint_every`` steps and at the end (``roles/checkpoint.py``: written
  in the background, resumable)
- waits for: groups (bounded by the run's wait_seconds, then an error saying which step it was filling)
- unblocked by: the reward (and reference) role's puts, which complete a group's columns

Streaming: a step does forward/backward on each delivery as it arrives (``StepAccumulator``) and steps
the optimizer once the batch is complete. Losses are accumulated as un-normalised sums and the
gradient is divided by the batch's normaliser at the end, so the step's gradient is the one the
whole batch would give in one pass: with staleness 0 this is synchronous training, not an approximation.

What trains: a sample whose reward failed (NaN) is skipped, and so is a whole group left with fewer
than two scored samples (or, with ``drop_uniform_groups``, one whose rewards are all equal). A step whose
every sample was skipped makes no update: the weights and the optimizer state stay as they are (AdamW
would move weights on a zero gradient through its momentum and weight decay), only the version moves
on, so admission control and the data position are unchanged; its metrics say ``step/updated: 0``.

Exactly-once: a step's rows stay leased until its optimizer step is done and are acked then (leases
held longer than half their term are renewed while the step fills, so none expires under it); the bus
releases a row once the actor acked it, so no sample trains twice.

Resume (``resume_from``): the engine is built from the checkpoint, restores its optimizer state and
version, and the loop goes on from there; the checkpoint's ``groups_by_step`` carries on, so every later
checkpoint still names every group the kept steps consumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyarrow as pa
import torch

from roles import schema
from roles.checkpoint import Checkpointer, read_state, restore_rng
from roles.interfaces import RoleContext, load_object
from roles.data_parallel import TrainerGroup
from roles.loss import aggregate, group_advantages, policy_loss
from roles.offpolicy import ess, lr_factor, opob_advantages, sequence_log_weights
from roles.sparse import DTYPES
from roles.weights import SyncConfig, WeightPublisher
from transfer import BusTimeout


@dataclass
class ActorConfig:
    """The algorithm and the optimizer."""

    engine: str = "hf"
    """'hf' (torch + transformers) or a dotted path to a TrainEngine class."""
    replicas: int = 1
    """Data-parallel trainer replicas: each trains on groups_per_step / replicas groups, gradients are summed."""
    groups_per_step: int = 16
    """Prompt groups per optimizer step (batch = groups_per_step x rollout.group_size samples)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    advantage: str = "grpo"
    """grpo | rloo | drgrpo | opob (VCPO's off-policy optimal baseline: one extra backward per sample)."""
    aggregation: str = "token_mean"
    """token_mean (DAPO) | seq_mean | constant (Dr.GRPO: samples x max_new_tokens)."""
    clip_low: float = 0.2
    """PPO clip: r >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO clip: r <= 1 + clip_high (DAPO clip-higher when above clip_low)."""
    old_logprobs: str = "rollout"
    """rollout: ratio against the rollout's logprobs (the clip is the only off-policy control);
    recompute: proximal ratio plus the importance weight chosen by ``correction`` (AReaL's decoupled PPO)."""
    ratio_level: str = "token"
    """token: PPO's per-token ratio; sequence: GSPO's exp(mean_t log ratio) (use clip_low/high ~ 3e-4/4e-4)."""
    correction: str = "none"
    """Importance weight of old_logprobs=recompute: tis (truncate at is_cap), mis (mask outside
    [1/is_cap, is_cap]) or none (untruncated); must stay none with old_logprobs=rollout."""
    correction_level: str = "token"
    """token: each token's own π/μ; sequence: the product over the response, shared by its tokens."""
    is_cap: float = 2.0
    """C of the truncation or mask (about 2 per token, 8 per sequence)."""
    vcpo: bool = False
    """Scale each step's learning rate by the ESS of the batch's sequence importance weights (VCPO)."""
    vcpo_rule: str = "sqrt"
    """lr x sqrt(min(1, ρ/ρ_ref)) (sqrt) or lr x min(1, ρ/ρ_ref) (linear), ρ = ESS / samples."""
    vcpo_ref: float = 1.0
    """ρ_ref: the ESS ratio at and above which the full learning rate applies."""
    kl_coef: float = 0.0
    """β of the k3 KL to the reference; > 0 starts the reference role."""
    drop_uniform_groups: bool = False
    """Skip groups whose rewards are all equal (no signal) instead of counting them in the normaliser."""
    micro_batch: int = 128
    """Most samples per forward/backward pass (bounds activation memory)."""
    temperature: float = 1.0
    """Scoring temperature; the recipes tie it to rollout.temperature."""
    max_new_tokens: int = 8
    """Used by aggregation=constant; the recipes tie it to rollout.max_new_tokens."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N steps (0: only the final one); written in the background."""
    checkpoint_keep: int = 2
    """Newest step-N checkpoints kept (older ones are deleted; `final` is always kept)."""
    device: str = "cpu"
    """torch device of the trained model."""
    threads: int = 1
    """torch intra-op threads."""
    seed: int = 0
    """torch seed."""


def make_engine(cfg: ActorConfig, model_path: str):
    if cfg.engine == "hf":
        from roles.hf import HFTrainEngine

        return HFTrainEngine(model_path, cfg)
    return load_object(cfg.engine, "actor.engine")(model_path, cfg)


def serve(cfg: ActorConfig, ctx: RoleContext, steps: int, staleness: int | None, sync: SyncConfig,
          broadcast: dict | None = None, resume_from: str | None = None, epoch: int = 0,
          samples_every: int = 0) -> None:
    """``sync.dtype`` must be resolved (the rollout's dtype): patches are diffed in what the rollout runs.

    ``broadcast`` (sglang rollouts with update=distributed): {"servers": N, "tp": tp size, "backend",
    "sglang": SGLangConfig}; the trainer then also installs every version on the servers itself
    (``roles/sglang_engine.WeightBroadcaster``). The weight channel still carries the versions the
    feeder's admission control reads.

    With ``cfg.replicas`` > 1 this is one of several data-parallel replicas (``roles/data_parallel.py``):
    it trains on its share of each step's groups, and replica 0 alone publishes, saves and reports.

    ``resume_from``: a checkpoint directory to continue from; ``epoch``: how many times the run was
    rewound (recorded in checkpoints). ``samples_every``: every that many steps the metrics report
    carries the step's first group (token ids, rewards), for the run's table of samples (0: never).
    """
    torch.manual_seed(cfg.seed)
    engine = make_engine(cfg, resume_from or ctx.model_path)
    # group ids each step consumed (the data position) and the uids it consumed without training them
    groups_by_step, skipped_by_step = _resume(engine, resume_from) if resume_from else ([], [])
    if cfg.replicas > 1 and not hasattr(engine, "gradients"):
        raise TypeError(f"actor.replicas={cfg.replicas} sums gradients across replicas: {type(engine).__name__} "
                        f"has no gradients() (see roles/interfaces.py)")
    group = TrainerGroup(ctx, cfg.replicas, cfg.device) if cfg.replicas > 1 else None
    lead = group is None or group.rank == 0
    publication = Publication(ctx, engine, sync, broadcast, cfg.device) if lead else None
    checkpoints = Checkpointer(f"{ctx.run_dir}/checkpoints", cfg.checkpoint_keep) \
        if lead and hasattr(engine, "snapshot") else None
    columns = schema.ACTOR_INPUT + (["ref_logprobs"] if cfg.kl_coef > 0 else [])
    share = cfg.groups_per_step // cfg.replicas  # validation makes it divide
    ctx.report("ready")
    try:
        while engine.version < steps:
            step, t0 = engine.version, time.monotonic()
            acc = StepAccumulator(engine, cfg)
            deliveries, waited = _fill(ctx, acc, columns, share, step, staleness)
            groups = list(dict.fromkeys(g for d in deliveries for g in d.table.column("group_id").to_pylist()))
            if group is not None:
                with ctx.timeline.span("all-reduce", step=step + 1):
                    groups = group.merge(acc, groups)
                    group.all_reduce_gradients(engine.gradients())
            with ctx.timeline.span("train", step=step + 1, optimizer_step=True):
                metrics = acc.finish()
            for d in deliveries:
                ctx.bus.ack(d)
            if not lead:
                continue
            groups_by_step.append(groups)
            skipped_by_step.append(acc.skipped_uids)
            with ctx.timeline.span("sync", step=step + 1, version=engine.version) as span:
                sync_metrics = publication.publish(engine)
                span["bytes"] = sync_metrics.get("sync/bytes")
            ckpt_metrics = {}
            if cfg.checkpoint_every and engine.version % cfg.checkpoint_every == 0 and engine.version < steps:
                with ctx.timeline.span("checkpoint", step=step + 1):
                    ckpt_metrics = _checkpoint(checkpoints, f"step-{engine.version}", engine, epoch,
                                               groups_by_step, skipped_by_step, ctx)
            elapsed = time.monotonic() - t0
            examples = {"examples": _examples(deliveries[0].table)} if samples_every and (step + 1) % samples_every == 0 else {}
            ctx.report("metrics", step=step + 1, **metrics, **{
                "actor/wait_s": waited, "actor/step_s": elapsed, "samples/s": metrics["samples"] / elapsed,
                **sync_metrics, **ckpt_metrics}, uids=acc.trained_uids, skipped_uids=acc.skipped_uids, **examples)
        identical = group.identical_weights(engine.weights()) if group is not None else True
        if lead:
            _checkpoint(checkpoints, "final", engine, epoch, groups_by_step, skipped_by_step, ctx)
            if checkpoints is not None:
                checkpoints.close(ctx.wait_seconds)
            ctx.report("done", version=engine.version, replicas=cfg.replicas, identical_weights=identical)
        else:  # the run ends on replica 0's report; stay until the launcher stops this replica
            time.sleep(ctx.wait_seconds)
    finally:
        if publication is not None:
            publication.close()
        if group is not None:
            group.close()


def _fill(ctx: RoleContext, acc: "StepAccumulator", columns: list[str], share: int, step: int,
          staleness: int | None) -> tuple[list, float]:
    """Take whole groups until ``acc`` holds this replica's ``share`` of the step, training on each delivery
    as it arrives; returns the deliveries (acked after the optimizer step) and the seconds spent waiting."""
    deliveries, waited = [], 0.0
    while acc.groups < share:
        t = time.monotonic()
        _renew_held(ctx, deliveries)
        with ctx.timeline.span("wait", step=step + 1, groups=acc.groups):
            deliveries.append(_take(ctx, columns, share - acc.groups, step, staleness, acc.groups, share))
        waited += time.monotonic() - t
        with ctx.timeline.span("train", step=step + 1, samples=len(deliveries[-1])):
            acc.add(deliveries[-1].table)
    return deliveries, waited


def _examples(table: pa.Table) -> list[dict]:
    """The first group of a delivery as token ids, rewards and versions: a sample of what the step trained."""
    first = table.column("group_id")[0].as_py()
    rows = [i for i, g in enumerate(table.column("group_id").to_pylist()) if g == first]
    pick = table.take(rows).select(["prompt_ids", "response_ids", "reward", "version_start"]).to_pylist()
    return [{**r, "reward": None if math.isnan(r["reward"]) else r["reward"]} for r in pick]


def _resume(engine, path: str) -> tuple[list[list[str]], list[list[str]]]:
    """Bring ``engine`` (built from checkpoint ``path``) to where it was; returns the checkpoint's data
    position (group ids per step) and the uids each step consumed without training."""
    if not hasattr(engine, "restore"):
        raise TypeError(f"resuming needs {type(engine).__name__}.restore(path, version) (see roles/interfaces.py)")
    state = read_state(path)
    engine.restore(path, state["version"])
    restore_rng(path)
    return state["groups_by_step"], state.get("skipped_by_step", [[] for _ in state["groups_by_step"]])


def _checkpoint(checkpoints: Checkpointer | None, name: str, engine, epoch: int, groups_by_step: list[list[str]],
                skipped_by_step: list[list[str]], ctx: RoleContext) -> dict[str, float]:
    """Checkpoint ``name`` in the background; an engine without ``snapshot()`` saves its model only (not resumable)."""
    if checkpoints is None:
        engine.save(f"{ctx.run_dir}/checkpoints/{name}")
        return {}
    t0 = time.monotonic()
    write = engine.snapshot()
    snapshot_s = time.monotonic() - t0
    state = {"version": engine.version, "epoch": epoch, "groups_by_step": list(groups_by_step),
             "skipped_by_step": list(skipped_by_step), "time": time.time()}
    return {**checkpoints.save(name, write, state, ctx.wait_seconds), "checkpoint/snapshot_s": snapshot_s}


def _renew_held(ctx: RoleContext, deliveries: list) -> None:
    """Renew the leases of this step's deliveries that are past half their term (a step may fill slowly)."""
    for d in deliveries:
        if time.monotonic() - d.leased_at > ctx.lease_seconds / 2:
            ctx.bus.renew(d, lease=ctx.lease_seconds)


class Publication:
    """Where each new version goes (replica 0 only): the weight channel, and first, with sglang's
    update=distributed, every rollout server (so a server holds a version before the feeder, which reads
    versions off the channel, can admit groups for it)."""

    def __init__(self, ctx: RoleContext, engine, sync: SyncConfig, broadcast: dict | None, device: str):
        self.sync, self.device = sync, device
        self.servers = self.channel = None
        try:
            if broadcast is not None:
                self.servers = _broadcaster(ctx, broadcast)
                self.servers.push(self._rollout_dtype(engine), engine.version, device)
            self.channel = WeightPublisher(ctx.endpoints.bind_address("weights"), sync, DTYPES[sync.dtype],
                                           ctx.keys_dir)
            ctx.endpoints.advertise("weights", self.channel.address)
            self.channel.publish(engine.version, engine.weights())
        except BaseException:
            self.close()
            raise

    def publish(self, engine) -> dict:
        """Publish the engine's current version; returns its ``sync/*`` metrics."""
        extra = {}
        if self.servers is not None:
            extra["sync/broadcast_s"] = self.servers.push(self._rollout_dtype(engine), engine.version, self.device)
        return {**self.channel.publish(engine.version, engine.weights()), **extra}

    def _rollout_dtype(self, engine) -> dict[str, torch.Tensor]:
        dtype = DTYPES[self.sync.dtype]
        return {k: v.to(dtype) for k, v in engine.weights().items()}

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.servers is not None:
            self.servers.close()


def _broadcaster(ctx: RoleContext, broadcast: dict):
    """Connect to every rollout replica's sglang server (endpoints ``sglang-<i>``) in one process group."""
    from roles.sglang_engine import WeightBroadcaster

    urls = [ctx.endpoints.lookup(f"sglang-{i}", ctx.wait_seconds) for i in range(broadcast["servers"])]
    address = ctx.endpoints.bind_address("trainer-broadcast")
    host = address[len("tcp://"):].rpartition(":")[0] if address.startswith("tcp://") else "127.0.0.1"
    return WeightBroadcaster(urls, [broadcast["tp"]] * len(urls), host, broadcast["backend"], broadcast["sglang"],
                             ctx.wait_seconds)


def _take(ctx: RoleContext, columns, n: int, step: int, staleness: int | None, have: int, want: int):
    where = None if staleness is None else [("target_step", "==", step)]
    try:
        return ctx.bus.get("actor", columns, n=n, min_n=1, groups=True, where=where, timeout=ctx.wait_seconds,
                           lease=ctx.lease_seconds)
    except BusTimeout as e:
        raise BusTimeout(f"the actor waited {ctx.wait_seconds:.0f}s for the groups of step {step} "
                         f"({have} of {want} in hand): are the rollout and reward roles alive and keeping up? ({e})") from e


class StepAccumulator:
    """One optimizer step's gradient, accumulated over deliveries of whole groups as they arrive.

    Off-policy bookkeeping: θ does not change until the step, so the sequence log weights log π_θ/μ of
    every trained sample, whichever delivery brought it, are comparable and together give the step's
    effective sample size. With ``vcpo`` the step's learning rate is scaled by lr_factor(ESS / samples)
    for this step only (the engine restores it). Skipped samples (a failed reward, a group without
    signal) carry no gradient and do not count in the ESS; with none trained the step makes no update.
    """

    def __init__(self, engine, cfg: ActorConfig):
        self.engine, self.cfg = engine, cfg
        self.groups = 0  # groups consumed (including skipped ones)
        self.normaliser = 0.0
        self.loss_sum = 0.0
        self.sums: dict[str, float] = {}
        self.tokens = 0.0
        self.rewards: list[float] = []
        self.staleness: list[int] = []
        self.lengths: list[int] = []
        self.skipped_groups = 0
        self.reward_errors = 0
        self.trained_uids: list[str] = []  # the samples this step trains on
        self.skipped_uids: list[str] = []  # consumed without training (failed reward, group without signal)
        self.seq_log_w: list[torch.Tensor] = []  # [B] per forward: log π_θ/μ of each trained sample
        self.token_log_w: list[torch.Tensor] = []  # flat log π_θ/μ of each trained token

    def add(self, table: pa.Table) -> None:
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(cols["group_id"]):
            by_group.setdefault(g, []).append(i)
        groups = []  # (rows, rewards) of the groups that train
        for idx in by_group.values():
            self.groups += 1
            self.staleness += [self.engine.version - cols["version_start"][i] for i in idx]
            valid = [i for i in idx if not math.isnan(cols["reward"][i])]
            self.reward_errors += len(idx) - len(valid)
            r = torch.tensor([cols["reward"][i] for i in valid], dtype=torch.float32)
            self.rewards += r.tolist()
            if len(valid) < 2 or (self.cfg.drop_uniform_groups and bool((r == r[0]).all())):
                self.skipped_groups += 1
                self.skipped_uids += [cols["uid"][i] for i in idx]
                continue
            self.skipped_uids += [cols["uid"][i] for i in idx if i not in valid]
            self.trained_uids += [cols["uid"][i] for i in valid]
            groups.append((valid, r))
        rows = [i for valid, _ in groups for i in valid]
        advantages = self._advantages(cols, groups, rows)
        for lo in range(0, len(rows), self.cfg.micro_batch):
            self._backward(cols, rows[lo: lo + self.cfg.micro_batch], advantages[lo: lo + self.cfg.micro_batch])

    def _advantages(self, cols: dict, groups: list, rows: list[int]) -> list[float]:
        """Advantages of ``rows`` (the training rows of ``groups``, in order)."""
        if self.cfg.advantage != "opob":
            return [a for _, r in groups for a in group_advantages(r, self.cfg.advantage).tolist()]
        if not hasattr(self.engine, "trajectory_grad_sq"):
            raise TypeError(f"actor.advantage=opob needs per-trajectory gradient norms: "
                            f"{type(self.engine).__name__} has no trajectory_grad_sq (see roles/interfaces.py)")
        if not rows:
            return []
        grad_sq, seq_logp = self.engine.trajectory_grad_sq([cols["prompt_ids"][i] for i in rows],
                                                           [cols["response_ids"][i] for i in rows])
        log_w = seq_logp - torch.tensor([sum(cols["rollout_logprobs"][i]) for i in rows], dtype=seq_logp.dtype)
        out, k = [], 0
        for valid, r in groups:
            out += opob_advantages(r, log_w[k: k + len(valid)], grad_sq[k: k + len(valid)]).tolist()
            k += len(valid)
        return out

    def _backward(self, cols: dict, rows: list[int], advantages: list[float]) -> None:
        prompts = [cols["prompt_ids"][i] for i in rows]
        responses = [cols["response_ids"][i] for i in rows]
        self.lengths += [len(r) for r in responses]
        logp = self.engine.token_logprobs(prompts, responses)  # [B, T]
        mask = torch.zeros_like(logp)
        rollout_logp = torch.zeros_like(logp)
        ref_logp = torch.zeros_like(logp) if self.cfg.kl_coef > 0 else None
        for j, i in enumerate(rows):
            t = len(responses[j])
            mask[j, :t] = 1.0
            rollout_logp[j, :t] = torch.tensor(cols["rollout_logprobs"][i])
            if ref_logp is not None:
                ref_logp[j, :t] = torch.tensor(cols["ref_logprobs"][i])
        c = self.cfg
        token_loss, stats = policy_loss(logp, rollout_logp, torch.tensor(advantages), mask,
                                        clip_low=c.clip_low, clip_high=c.clip_high, old_logprobs=c.old_logprobs,
                                        ratio_level=c.ratio_level, correction=c.correction,
                                        correction_level=c.correction_level, is_cap=c.is_cap,
                                        kl_coef=c.kl_coef, ref_logp=ref_logp)
        total, count = aggregate(token_loss, mask, c.aggregation, c.max_new_tokens)
        total.backward()
        self.loss_sum += total.item()
        self.normaliser += count
        self.tokens += float(mask.sum())
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float((value * mask).sum())
        self.seq_log_w.append(sequence_log_weights(logp, rollout_logp, mask))
        self.token_log_w.append((logp.detach() - rollout_logp)[mask.bool()])

    def finish(self) -> dict[str, float]:
        """Step the optimizer on the accumulated gradient divided by the batch's normaliser, at this
        step's learning rate (VCPO's factor when ``vcpo``)."""
        scale = 1.0 / self.normaliser if self.normaliser > 0 else 0.0
        log_w = torch.cat(self.seq_log_w) if self.seq_log_w else torch.zeros(0)
        ess_ratio = ess(log_w) / log_w.numel() if log_w.numel() else 1.0
        factor = lr_factor(ess_ratio, self.cfg.vcpo_rule, self.cfg.vcpo_ref) if self.cfg.vcpo else 1.0
        if self.trained_uids:
            out = {**self.engine.step(scale, factor), "step/updated": 1}
        else:  # nothing to train: no update (see the module docstring), the version moves on
            self.engine.version += 1
            out = {"actor/grad_norm": 0.0, "lr/effective": 0.0, "step/updated": 0}
        n = len(self.rewards)
        mean = sum(self.rewards) / n if n else math.nan
        out.update({
            "loss": self.loss_sum * scale,
            "reward/mean": mean,
            "reward/std": (sum((r - mean) ** 2 for r in self.rewards) / n) ** 0.5 if n else math.nan,
            "reward/errors": self.reward_errors,
            "staleness/max": max(self.staleness, default=0),
            "staleness/mean": sum(self.staleness) / len(self.staleness) if self.staleness else 0.0,
            "staleness/counts": [self.staleness.count(k) for k in range(max(self.staleness, default=0) + 1)],
            "response/length_mean": sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
            "groups/skipped": self.skipped_groups,
            "samples": len(self.staleness),
            "samples/trained": len(self.trained_uids),
            "samples/skipped": len(self.skipped_uids),
            "tokens": self.tokens,
            "ess/ratio": ess_ratio,
            "lr/factor": factor,
            **_weight_quantiles("is/seq", log_w),
            **_weight_quantiles("is/token", torch.cat(self.token_log_w) if self.token_log_w else torch.zeros(0)),
        })
        for name, total in self.sums.items():
            out[STAT_NAMES.get(name, f"actor/{name}")] = total / self.tokens if self.tokens else 0.0
        return out


STAT_NAMES = {"is_weight": "is/weight_mean", "is_cut": "is/cut_frac", "rollout_kl": "kl/rollout_k3"}
"""Metric names of policy_loss's per-token diagnostics (token means); the rest are actor/<name>."""


def _weight_quantiles(prefix: str, log_w: torch.Tensor) -> dict[str, float]:
    """max and p99 of importance weights given by their logs (capped at e^700 so they stay finite)."""
    if log_w.numel() == 0:
        return {f"{prefix}_max": 1.0, f"{prefix}_p99": 1.0}
    log_w = log_w.double().clamp(max=700.0)
    return {f"{prefix}_max": math.exp(float(log_w.max())), f"{prefix}_p99": math.exp(float(torch.quantile(log_w, 0.99)))}
