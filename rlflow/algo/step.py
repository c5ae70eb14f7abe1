"""The step accumulator: one optimizer step's gradient, streamed in over deliveries of whole groups.

Losses are accumulated as un-normalised sums and the gradient is divided by the batch's normaliser at
the end (``finish``), so the step's gradient is the one the whole batch would give in one pass: with
staleness 0 this is synchronous training, not an approximation (pinned by tests/test_streaming_step.py).

``cfg`` is the actor's config (``roles/config.py ActorConfig``); only its algorithm fields are read here.
The engine is a ``TrainEngine`` (``engines/base.py``).
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow as pa
import torch

from rlflow.algo.loss import aggregate, group_advantages, policy_loss
from rlflow.algo.offpolicy import ess, lr_factor, opob_advantages, sequence_log_weights
from rlflow.algo import segments


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None = None,
                  padded: bool = True) -> list[list[int]]:
    """Indices of ``lengths`` (tokens per sample) in forward/backward passes of at most ``max_rows`` samples
    and, with ``max_tokens``, at most that many tokens: counting padding to the pass's longest sample, or
    (``padded=False``: passes packed without padding, ``actor.padding_free``) the samples' own tokens.

    With a token budget the samples are taken longest first, so each pass pads little and the first pass
    is the largest (memory peaks at once, not late in a step); a sample over the budget gets a pass of its
    own. Without one the samples keep their order, ``max_rows`` at a time. Every index appears once: the
    passes' gradients sum to the whole batch's, since losses are accumulated as un-normalised sums.
    """
    if max_tokens is None:
        return [list(range(lo, min(lo + max_rows, len(lengths)))) for lo in range(0, len(lengths), max_rows)]
    out: list[list[int]] = []
    size = 0  # tokens of the last pass, as it costs
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        batch = out[-1] if out else None
        # sorted longest first: a pass's padded size is its first (longest) sample's length x its size
        grown = lengths[batch[0]] * (len(batch) + 1) if padded and batch else size + lengths[k]
        if batch is None or len(batch) >= max_rows or grown > max_tokens:
            out.append([k])
            size = lengths[k]
        else:
            batch.append(k)
            size = grown
    return out


class Chunk:
    """What passes over some samples added up: the un-normalised loss and its normaliser, the trained
    tokens, each diagnostic's token sum, and the importance log weights (a chunk merges across ranks)."""

    def __init__(self):
        self.loss_sum, self.normaliser, self.tokens = 0.0, 0.0, 0.0
        self.sums: dict[str, float] = {}
        self.seq_log_w: list[torch.Tensor] = []  # [B] per pass: log π_θ/μ of each trained sample
        self.token_log_w: list[torch.Tensor] = []  # flat log π_θ/μ of each trained token

    def log_w(self) -> torch.Tensor:
        return torch.cat(self.seq_log_w) if self.seq_log_w else torch.zeros(0)

    def add(self, other: "Chunk") -> None:
        self.loss_sum += other.loss_sum
        self.normaliser += other.normaliser
        self.tokens += other.tokens
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.seq_log_w += other.seq_log_w
        self.token_log_w += other.token_log_w


class StepAccumulator:
    """One policy version's training, accumulated over deliveries of whole groups as they arrive.

    Off-policy bookkeeping: θ does not change until the step, so the sequence log weights log π_θ/μ of
    every trained sample, whichever delivery brought it, are comparable and together give the step's
    effective sample size. With ``vcpo`` the step's learning rate is scaled by lr_factor(ESS / samples)
    for this step only (the engine restores it). Skipped samples (a failed reward, a group without
    signal) carry no gradient and do not count in the ESS; with none trained the step makes no update.

    Streaming (one optimizer step per version, ``minibatches = epochs = 1``, not sharded): each delivery's
    passes run as it arrives and ``finish`` steps once. Held (sharded, or several optimizer steps per
    version): ``add`` keeps the trained groups and ``finish`` trains them, ``epochs`` times over, in
    ``minibatches`` of whole groups, one optimizer step each; only the last moves the version on. The
    proximal logprobs (old_logprobs=recompute) are scored once, before the first update; the
    normaliser, the ESS and VCPO's factor are each minibatch's own (across ranks).

    Ranks (``ranks``: a ``train/data_parallel.TrainerGroup``, or None for one trainer): held updates
    sum gradients per minibatch (replicate) or run in lockstep (sharded: every pass is a collective, so
    the ranks agree on how many each runs and a rank with fewer runs ``idle_pass``es, which add exactly
    nothing). The step's statistics are merged by the actor (``TrainerGroup.merge``) before ``finish``.
    """

    def __init__(self, engine, cfg, max_new_tokens: int, lockstep: bool = False, ranks=None, keep_group=None):
        """``cfg``: the actor's ActorConfig; ``max_new_tokens``: the rollout's (aggregation=constant divides
        by it); ``lockstep``: a sharded trainer's ranks run every pass together; ``ranks``: see above;
        ``keep_group``: dynamic sampling's criterion (``algo/filters.py``): a group it refuses is filtered."""
        self.engine, self.cfg, self.max_new_tokens = engine, cfg, max_new_tokens
        self.keep_group = keep_group
        self.lockstep, self.ranks = lockstep, ranks
        self.updates = cfg.minibatches * cfg.epochs  # optimizer steps per version
        self.held: dict[str, list[tuple]] | None = {} if lockstep or self.updates > 1 else None  # group id ->
        # its trained samples (cols, row, advantage), until ``finish`` (None: streaming)
        self.groups = 0  # groups consumed (including skipped ones)
        self.group_ids: list[str] = []  # their ids (every rank's, once merged: minibatches are cut from them)
        self.total = Chunk()  # what the step's passes added up (every rank's, once merged)
        self.rewards: list[float] = []
        self.staleness: list[int] = []
        self.lengths: list[int] = []
        self.skipped_groups = 0
        self.reward_errors = 0
        self.trained_uids: list[str] = []  # the samples this step trains on
        self.skipped_uids: list[str] = []  # consumed without training (failed reward, group without signal)
        self.filtered_groups = 0  # groups ``keep_group`` refused (dynamic sampling): their uids are skipped too
        self.filtered_uids: list[str] = []
        self.episodes: Counter = Counter()  # multi-turn rows consumed: turns, tokens, environment counters
        self.spanned: list[int] = []  # single-turn rows with token_versions (in-flight updates): versions each spans
        self.sourced: list[tuple[str, float]] = []  # data.sources: (source, reward) of every consumed row
        self.group_means: list[tuple[str, float]] = []  # (group id, mean scored reward) of every consumed group

    def add(self, table: pa.Table) -> None:
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        if "loss_mask" in cols:
            self._count_episodes(cols)
        elif "token_versions" in cols:
            self.spanned += [len(set(v)) for v in cols["token_versions"]]
        if "data_source" in cols:
            self.sourced += list(zip(cols["data_source"], cols["reward"]))
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(cols["group_id"]):
            by_group.setdefault(g, []).append(i)
        groups = []  # (rows, rewards) of the groups that train
        for gid, idx in by_group.items():
            self.groups += 1
            self.group_ids.append(gid)
            self.staleness += [self.engine.version - cols["version_start"][i] for i in idx]
            valid = [i for i in idx if not math.isnan(cols["reward"][i])]
            self.reward_errors += len(idx) - len(valid)
            r = torch.tensor([cols["reward"][i] for i in valid], dtype=torch.float32)
            self.rewards += r.tolist()
            if valid:
                self.group_means.append((gid, float(r.mean())))
            if len(valid) >= 2 and self.keep_group is not None and not self.keep_group(r.tolist()):
                self.filtered_groups += 1  # dynamic sampling: replaced (before drop_uniform_groups, which is not)
                self.filtered_uids += [cols["uid"][i] for i in idx]
                self.skipped_uids += [cols["uid"][i] for i in idx]
                continue
            if len(valid) < 2 or (self.cfg.drop_uniform_groups and bool((r == r[0]).all())):
                self.skipped_groups += 1
                self.skipped_uids += [cols["uid"][i] for i in idx]
                continue
            self.skipped_uids += [cols["uid"][i] for i in idx if i not in valid]
            self.trained_uids += [cols["uid"][i] for i in valid]
            groups.append((valid, r, gid))
        rows = [i for valid, _, _ in groups for i in valid]
        advantages = dict(zip(rows, self._advantages(cols, groups, rows)))
        self.lengths += [len(cols["response_ids"][i]) for i in rows]
        if self.held is not None:
            self.held.update({gid: [(cols, i, advantages[i]) for i in valid] for valid, _, gid in groups})
            return
        for batch in self._passes([(cols, i, advantages[i]) for i in rows]):
            self.total.add(self._backward(batch))

    def _passes(self, samples: list[tuple]) -> list[list[tuple]]:
        """``samples`` cut into forward/backward passes (``micro_batches``)."""
        lengths = [len(c["prompt_ids"][i]) + len(c["response_ids"][i]) for c, i, _ in samples]
        return [[samples[k] for k in batch]
                for batch in micro_batches(lengths, self.cfg.micro_batch, self.cfg.max_tokens_per_microbatch,
                                           padded=not self.cfg.padding_free)]

    def _agreed_passes(self, samples: list[tuple]) -> tuple[list[list[tuple]], int]:
        """``samples``' passes, and the idle ones this rank adds so that every rank of a sharded trainer
        runs as many (agreed before any pass runs: each is a collective)."""
        passes = self._passes(samples)
        return passes, self.ranks.most(len(passes)) - len(passes) if self.lockstep else 0

    def _count_episodes(self, cols: dict) -> None:
        """What the step's metrics say of its episodes (every consumed row, trained or not)."""
        e = self.episodes
        for mask, starts, why, info, versions in zip(cols["loss_mask"], cols["turn_starts"], cols["finish_reason"],
                                                     cols["env_info"], cols["token_versions"]):
            info = json.loads(info)
            e["episodes"] += 1
            e["turns"] += len(starts)
            e["tokens"] += len(mask)
            e["policy_tokens"] += sum(mask)
            e[f"finish:{why}"] += 1
            e["env_seconds"] += info["env_seconds"]
            e["seconds"] += info["seconds"]
            spanned = len({v for v, m in zip(versions, mask) if m})
            e["versions_spanned"] += spanned
            e["multi_version"] += spanned > 1
            for name, value in info["counters"].items():
                e[f"count:{name}"] += value

    def _advantages(self, cols: dict, groups: list, rows: list[int]) -> list[float]:
        """Advantages of ``rows`` (the training rows of ``groups``, in order)."""
        if self.cfg.advantage != "opob":
            return [a for _, r, _ in groups for a in group_advantages(r, self.cfg.advantage).tolist()]
        if not hasattr(self.engine, "trajectory_grad_sq"):
            raise TypeError(f"actor.advantage=opob needs per-trajectory gradient norms: "
                            f"{type(self.engine).__name__} has no trajectory_grad_sq (see engines/base.py)")
        if not rows:
            return []
        masks = {"masks": [cols["loss_mask"][i] for i in rows], "segment_starts": [cols["segment_starts"][i] for i in rows]} \
            if "loss_mask" in cols else {}
        grad_sq, seq_logp = self.engine.trajectory_grad_sq([cols["prompt_ids"][i] for i in rows],
                                                           [cols["response_ids"][i] for i in rows], **masks)
        log_w = seq_logp - torch.tensor([sum(cols["rollout_logprobs"][i]) for i in rows], dtype=seq_logp.dtype)
        out, k = [], 0
        for valid, r, _ in groups:
            out += opob_advantages(r, log_w[k: k + len(valid)], grad_sq[k: k + len(valid)]).tolist()
            k += len(valid)
        return out

    def _logprobs(self, samples: list[tuple]) -> torch.Tensor:
        """[B, T] log π_θ of the samples' responses (each segment against its own context)."""
        prompts = [c["prompt_ids"][i] for c, i, _ in samples]
        responses = [c["response_ids"][i] for c, i, _ in samples]
        starts = [c["segment_starts"][i] for c, i, _ in samples] if "segment_starts" in samples[0][0] else None
        return segments.score(self.engine.token_logprobs, prompts, responses, starts)

    def _backward(self, samples: list[tuple], prox: dict | None = None) -> Chunk:
        """One forward/backward pass over ``samples`` ((cols, row, advantage) each); ``prox``: uid ->
        proximal logprobs (held updates with old_logprobs=recompute)."""
        logp = self._logprobs(samples)  # [B, T]
        mask = torch.zeros_like(logp)
        rollout_logp = torch.zeros_like(logp)
        ref_logp = torch.zeros_like(logp) if self.cfg.kl_coef > 0 else None
        prox_logp = torch.zeros_like(logp) if prox is not None else None
        for j, (cols, i, _) in enumerate(samples):
            t = len(cols["response_ids"][i])
            # Episodes train only on what the policy sampled (loss_mask 1); observations weigh exactly 0
            mask[j, :t] = torch.tensor(cols["loss_mask"][i], dtype=mask.dtype) if "loss_mask" in cols else 1.0
            rollout_logp[j, :t] = torch.tensor(cols["rollout_logprobs"][i])
            if ref_logp is not None:
                ref_logp[j, :t] = torch.tensor(cols["ref_logprobs"][i])
            if prox_logp is not None:
                prox_logp[j, :t] = prox[cols["uid"][i]]
        c = self.cfg
        token_loss, stats = policy_loss(logp, rollout_logp, torch.tensor([a for _, _, a in samples]), mask,
                                        clip_low=c.clip_low, clip_high=c.clip_high, old_logprobs=c.old_logprobs,
                                        ratio_level=c.ratio_level, correction=c.correction,
                                        correction_level=c.correction_level, is_cap=c.is_cap,
                                        kl_coef=c.kl_coef, ref_logp=ref_logp, prox_logp=prox_logp)
        total, count = aggregate(token_loss, mask, c.aggregation, self.max_new_tokens)
        total.backward()
        out = Chunk()
        out.loss_sum, out.normaliser, out.tokens = total.item(), count, float(mask.sum())
        out.sums = {name: float((value * mask).sum()) for name, value in stats.items()}
        # the importance weights the loss applies: π_θ/μ, or π_prox/μ when the version's proximal policy is fixed
        weighted = logp if prox_logp is None else prox_logp
        out.seq_log_w.append(sequence_log_weights(weighted, rollout_logp, mask))
        out.token_log_w.append((weighted.detach() - rollout_logp)[mask.bool()])  # masked-in tokens only
        return out

    def finish(self) -> dict[str, float]:
        """Step the optimizer on the accumulated gradient divided by the batch's normaliser, at this
        step's learning rate (VCPO's factor when ``vcpo``); held: train the held groups first, one
        optimizer step per minibatch and epoch."""
        if self.held is not None:
            return self._metrics(self._train_held())
        total = self.total
        scale = 1.0 / total.normaliser if total.normaliser > 0 else 0.0
        log_w = total.log_w()
        ess_ratio = ess(log_w) / log_w.numel() if log_w.numel() else 1.0
        factor = lr_factor(ess_ratio, self.cfg.vcpo_rule, self.cfg.vcpo_ref) if self.cfg.vcpo else 1.0
        if self.trained_uids:
            out = {**self.engine.step(scale, factor), "step/updated": 1}
        else:  # nothing to train: no update (see the module docstring), the version moves on
            self.engine.version += 1
            out = {"actor/grad_norm": 0.0, "lr/effective": 0.0, "step/updated": 0}
        return self._metrics([{**out, "loss": total.loss_sum * scale, "ess/ratio": ess_ratio, "lr/factor": factor}])

    def _train_held(self) -> list[dict]:
        """Train the held groups: ``epochs`` passes over them in ``minibatches``, an optimizer step each
        (see the class docstring); returns each update's metrics. Every rank calls it."""
        cfg = self.cfg
        self.total = Chunk()  # the held updates' totals, each merged across ranks
        if not self.trained_uids:  # on no rank: no update, the version moves on
            self.engine.version += 1
            return [{"actor/grad_norm": 0.0, "lr/effective": 0.0, "step/updated": 0, "loss": 0.0, "ess/ratio": 1.0,
                     "lr/factor": 1.0}]
        prox = self._proximal() if cfg.old_logprobs == "recompute" and self.updates > 1 else None
        # Minibatches are cut from every rank's groups in one order all ranks compute alike (sorted ids, then
        # a shuffle seeded by the version), so N ranks take the updates one trainer would; each trains the
        # groups of a minibatch it holds.
        ids = sorted(self.group_ids)
        shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.engine.version)
        log = []
        for epoch in range(cfg.epochs):
            order = ids if epoch == 0 else [ids[k] for k in torch.randperm(len(ids), generator=shuffle)]
            for m in range(cfg.minibatches):
                part = order[m * len(order) // cfg.minibatches: (m + 1) * len(order) // cfg.minibatches]
                last = epoch == cfg.epochs - 1 and m == cfg.minibatches - 1
                log.append(self._update([s for g in part for s in self.held.get(g, [])], prox, last))
        return log

    def _update(self, samples: list[tuple], prox: dict | None, last: bool) -> dict:
        """One minibatch: its passes, its normaliser and ESS across ranks, one optimizer step."""
        chunk = Chunk()
        passes, idle = self._agreed_passes(samples)
        for batch in passes:
            chunk.add(self._backward(batch, prox))
        for _ in range(idle):
            idle_pass(self.engine)
        if self.ranks is not None:
            chunk = self.ranks.merge_chunk(chunk)
            if not self.lockstep:
                self.ranks.all_reduce_gradients(self.engine.gradients())
        self.total.add(chunk)
        log_w = chunk.log_w()
        ess_ratio = ess(log_w) / log_w.numel() if log_w.numel() else 1.0
        factor = lr_factor(ess_ratio, self.cfg.vcpo_rule, self.cfg.vcpo_ref) if self.cfg.vcpo else 1.0
        scale = 1.0 / chunk.normaliser if chunk.normaliser > 0 else 0.0
        if chunk.normaliser > 0:
            advance = {} if self.updates == 1 else {"advance": last}
            out = {**self.engine.step(scale, factor, **advance), "step/updated": 1}
        else:  # this minibatch trained nothing on any rank: no optimizer step (its gradients are zeros)
            if last:
                self.engine.version += 1
            out = {"actor/grad_norm": 0.0, "lr/effective": 0.0, "step/updated": 0}
        stats = {name: total / chunk.tokens if chunk.tokens else 0.0 for name, total in chunk.sums.items()}
        return {**out, "loss": chunk.loss_sum * scale, "ess/ratio": ess_ratio, "lr/factor": factor,
                "clip_frac": stats.get("clip_frac", 0.0), "approx_kl": stats.get("approx_kl", 0.0)}

    @torch.no_grad()
    def _proximal(self) -> dict[str, torch.Tensor]:
        """uid -> [T] log π of each held sample under the weights at the version's start (one scoring)."""
        samples = [s for g in self.held.values() for s in g]
        passes, idle = self._agreed_passes(samples)
        out = {}
        for batch in passes:
            logp = self._logprobs(batch)
            for j, (cols, i, _) in enumerate(batch):
                out[cols["uid"][i]] = logp[j, : len(cols["response_ids"][i])].clone()
        for _ in range(idle):
            self.engine.token_logprobs([[0]], [[0]])  # an idle forward: the ranks' all-gathers pair up
        return out

    def _metrics(self, updates: list[dict]) -> dict[str, float]:
        """The step's metrics: the first update's ESS and VCPO factor (the batch against the version it
        was trained from), the mean loss and gradient norm over updates; with several updates, each
        one's clip fraction, approximate KL, ESS, factor and gradient norm as lists (``minibatch/*``)."""
        first, total = updates[0], self.total
        out = {"actor/grad_norm": sum(u["actor/grad_norm"] for u in updates) / len(updates),
               "lr/effective": first["lr/effective"], "step/updated": max(u["step/updated"] for u in updates),
               "loss": sum(u["loss"] for u in updates) / len(updates), "ess/ratio": first["ess/ratio"],
               "lr/factor": first["lr/factor"]}
        if len(updates) > 1:
            for key, name in (("clip_frac", "clip_frac"), ("approx_kl", "approx_kl"), ("ess/ratio", "ess_ratio"),
                              ("lr/factor", "lr_factor"), ("actor/grad_norm", "grad_norm"), ("loss", "loss")):
                out[f"minibatch/{name}"] = [u.get(key, 0.0) for u in updates]
        n = len(self.rewards)
        mean = sum(self.rewards) / n if n else math.nan
        out.update({
            "reward/mean": mean,
            "reward/std": (sum((r - mean) ** 2 for r in self.rewards) / n) ** 0.5 if n else math.nan,
            "reward/errors": self.reward_errors,
            "staleness/max": max(self.staleness, default=0),
            "staleness/mean": sum(self.staleness) / len(self.staleness) if self.staleness else 0.0,
            "staleness/counts": [self.staleness.count(k) for k in range(max(self.staleness, default=0) + 1)],
            "response/length_mean": sum(self.lengths) / len(self.lengths) if self.lengths else 0.0,
            "groups/skipped": self.skipped_groups,
            **({"filter/groups": self.filtered_groups} if self.keep_group is not None else {}),
            "samples": len(self.staleness),
            "samples/trained": len(self.trained_uids),
            "samples/skipped": len(self.skipped_uids),
            "tokens": total.tokens / (self.cfg.epochs if self.held is not None else 1),  # each epoch saw them all
            **_weight_quantiles("is/seq", total.log_w()),
            **_weight_quantiles("is/token", torch.cat(total.token_log_w) if total.token_log_w else torch.zeros(0)),
        })
        for name, value in total.sums.items():
            out[STAT_NAMES.get(name, f"actor/{name}")] = value / total.tokens if total.tokens else 0.0
        if self.episodes:
            out.update(episode_metrics(self.episodes))
        if self.sourced:
            out.update(source_metrics(self.sourced))
        if self.spanned:
            out.update({"rollout/versions_spanned_mean": sum(self.spanned) / len(self.spanned),
                        "rollout/multi_version_frac": sum(n > 1 for n in self.spanned) / len(self.spanned)})
        return out


def idle_pass(engine) -> None:
    """A forward and backward whose loss is multiplied by 0: it adds exactly nothing to any gradient, and
    keeps a sharded rank with fewer passes in step with the others' collectives."""
    (engine.token_logprobs([[0]], [[0]]).sum() * 0.0).backward()


def source_metrics(sourced: list[tuple[str, float]]) -> dict[str, float]:
    """Per data source (``data.sources``): its samples in the step and their mean reward (failed ones left
    out of the mean; NaN when none scored)."""
    out = {}
    for name in sorted({s for s, _ in sourced}):
        rewards = [r for s, r in sourced if s == name]
        scored = [r for r in rewards if not math.isnan(r)]
        out[f"source/{name}/samples"] = len(rewards)
        out[f"source/{name}/reward_mean"] = sum(scored) / len(scored) if scored else math.nan
    return out


def episode_metrics(e: Counter) -> dict[str, float]:
    """Per-step metrics of multi-turn episodes: turns, the masked-out share of tokens, how episodes ended,
    and each environment counter per episode (``env/tool_call`` is tool calls per episode)."""
    n = e["episodes"]
    out = {"episode/turns_mean": e["turns"] / n, "episode/masked_out_frac": 1.0 - e["policy_tokens"] / max(e["tokens"], 1),
           "episode/policy_tokens_mean": e["policy_tokens"] / n, "episode/seconds_mean": e["seconds"] / n,
           "episode/max_turns_frac": e["finish:max_turns"] / n, "episode/max_context_frac": e["finish:max_context"] / n,
           "episode/versions_spanned_mean": e["versions_spanned"] / n, "episode/multi_version_frac": e["multi_version"] / n,
           "env/seconds_mean": e["env_seconds"] / n,
           "env/failures": sum(v for k, v in e.items() if k.startswith("finish:env_"))}
    for key, value in e.items():
        if key.startswith("count:"):
            out[f"env/{key[6:]}"] = value / n
    return out


STAT_NAMES = {"is_weight": "is/weight_mean", "is_cut": "is/cut_frac", "rollout_kl": "kl/rollout_k3",
              "approx_kl": "kl/approx"}
"""Metric names of policy_loss's per-token diagnostics (token means); the rest are actor/<name>."""


def _weight_quantiles(prefix: str, log_w: torch.Tensor) -> dict[str, float]:
    """max and p99 of importance weights given by their logs (capped at e^700 so they stay finite)."""
    if log_w.numel() == 0:
        return {f"{prefix}_max": 1.0, f"{prefix}_p99": 1.0}
    log_w = log_w.double().clamp(max=700.0)
    return {f"{prefix}_max": math.exp(float(log_w.max())), f"{prefix}_p99": math.exp(float(torch.quantile(log_w, 0.99)))}
