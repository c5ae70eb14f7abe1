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


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` (tokens per sample) in forward/backward passes of at most ``max_rows`` samples
    and, with ``max_tokens``, at most that many tokens counting padding to the pass's longest sample.

    With a token budget the samples are taken longest first, so each pass pads little and the first pass
    is the largest (memory peaks at once, not late in a step); a sample over the budget gets a pass of its
    own. Without one the samples keep their order, ``max_rows`` at a time. Every index appears once: the
    passes' gradients sum to the whole batch's, since losses are accumulated as un-normalised sums.
    """
    if max_tokens is None:
        return [list(range(lo, min(lo + max_rows, len(lengths)))) for lo in range(0, len(lengths), max_rows)]
    out: list[list[int]] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        batch = out[-1] if out else None
        # sorted longest first: a pass's padded size is its first (longest) sample's length x its size
        if batch is None or len(batch) >= max_rows or lengths[batch[0]] * (len(batch) + 1) > max_tokens:
            out.append([k])
        else:
            batch.append(k)
    return out


class StepAccumulator:
    """One optimizer step's gradient, accumulated over deliveries of whole groups as they arrive.

    Off-policy bookkeeping: θ does not change until the step, so the sequence log weights log π_θ/μ of
    every trained sample, whichever delivery brought it, are comparable and together give the step's
    effective sample size. With ``vcpo`` the step's learning rate is scaled by lr_factor(ESS / samples)
    for this step only (the engine restores it). Skipped samples (a failed reward, a group without
    signal) carry no gradient and do not count in the ESS; with none trained the step makes no update.

    Lockstep (a sharded trainer, where every pass is a collective of all ranks): ``add`` queues its
    passes instead of running them, and ``run_queued(n)`` runs them once the ranks agreed on ``n``, the
    most any rank queued; the rest of the ``n`` are idle passes whose loss is multiplied by 0, so they
    add exactly nothing. The step's gradient is the same; only streaming within the step is given up.
    """

    def __init__(self, engine, cfg, max_new_tokens: int, lockstep: bool = False):
        """``cfg``: the actor's ActorConfig; ``max_new_tokens``: the rollout's (aggregation=constant divides
        by it); ``lockstep``: queue passes for ``run_queued`` (see the class docstring)."""
        self.engine, self.cfg, self.max_new_tokens = engine, cfg, max_new_tokens
        self.lockstep = lockstep
        self.queued: list[tuple] = []  # (cols, rows, advantages) of each pass not run yet (lockstep)
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
        self.episodes: Counter = Counter()  # multi-turn rows consumed: turns, tokens, environment counters

    def add(self, table: pa.Table) -> None:
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        if "loss_mask" in cols:
            self._count_episodes(cols)
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
        advantages = dict(zip(rows, self._advantages(cols, groups, rows)))
        lengths = [len(cols["prompt_ids"][i]) + len(cols["response_ids"][i]) for i in rows]
        for batch in micro_batches(lengths, self.cfg.micro_batch, self.cfg.max_tokens_per_microbatch):
            picked = [rows[k] for k in batch]
            work = (cols, picked, [advantages[i] for i in picked])
            if self.lockstep:
                self.queued.append(work)
            else:
                self._backward(*work)

    def run_queued(self, passes: int) -> None:
        """Run the queued passes, then idle ones up to ``passes`` (every rank of a lockstep step runs as many)."""
        if passes < len(self.queued):
            raise ValueError(f"{len(self.queued)} passes are queued but the ranks agreed on {passes}")
        for work in self.queued:
            self._backward(*work)
        for _ in range(passes - len(self.queued)):
            (self.engine.token_logprobs([[0]], [[0]]).sum() * 0.0).backward()  # its gradient is exactly 0
        self.queued = []

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
            return [a for _, r in groups for a in group_advantages(r, self.cfg.advantage).tolist()]
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
        for valid, r in groups:
            out += opob_advantages(r, log_w[k: k + len(valid)], grad_sq[k: k + len(valid)]).tolist()
            k += len(valid)
        return out

    def _backward(self, cols: dict, rows: list[int], advantages: list[float]) -> None:
        prompts = [cols["prompt_ids"][i] for i in rows]
        responses = [cols["response_ids"][i] for i in rows]
        self.lengths += [len(r) for r in responses]
        starts = [cols["segment_starts"][i] for i in rows] if "segment_starts" in cols else None
        logp = segments.score(self.engine.token_logprobs, prompts, responses, starts)  # [B, T]
        mask = torch.zeros_like(logp)
        rollout_logp = torch.zeros_like(logp)
        ref_logp = torch.zeros_like(logp) if self.cfg.kl_coef > 0 else None
        for j, i in enumerate(rows):
            t = len(responses[j])
            # Episodes train only on what the policy sampled (loss_mask 1); observations weigh exactly 0
            mask[j, :t] = torch.tensor(cols["loss_mask"][i], dtype=mask.dtype) if "loss_mask" in cols else 1.0
            rollout_logp[j, :t] = torch.tensor(cols["rollout_logprobs"][i])
            if ref_logp is not None:
                ref_logp[j, :t] = torch.tensor(cols["ref_logprobs"][i])
        c = self.cfg
        token_loss, stats = policy_loss(logp, rollout_logp, torch.tensor(advantages), mask,
                                        clip_low=c.clip_low, clip_high=c.clip_high, old_logprobs=c.old_logprobs,
                                        ratio_level=c.ratio_level, correction=c.correction,
                                        correction_level=c.correction_level, is_cap=c.is_cap,
                                        kl_coef=c.kl_coef, ref_logp=ref_logp)
        total, count = aggregate(token_loss, mask, c.aggregation, self.max_new_tokens)
        total.backward()
        self.loss_sum += total.item()
        self.normaliser += count
        self.tokens += float(mask.sum())
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + float((value * mask).sum())
        self.seq_log_w.append(sequence_log_weights(logp, rollout_logp, mask))
        self.token_log_w.append((logp.detach() - rollout_logp)[mask.bool()])  # masked-in tokens only

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
        if self.episodes:
            out.update(episode_metrics(self.episodes))
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


STAT_NAMES = {"is_weight": "is/weight_mean", "is_cut": "is/cut_frac", "rollout_kl": "kl/rollout_k3"}
"""Metric names of policy_loss's per-token diagnostics (token means); the rest are actor/<name>."""


def _weight_quantiles(prefix: str, log_w: torch.Tensor) -> dict[str, float]:
    """max and p99 of importance weights given by their logs (capped at e^700 so they stay finite)."""
    if log_w.numel() == 0:
        return {f"{prefix}_max": 1.0, f"{prefix}_p99": 1.0}
    log_w = log_w.double().clamp(max=700.0)
    return {f"{prefix}_max": math.exp(float(log_w.max())), f"{prefix}_p99": math.exp(float(torch.quantile(log_w, 0.99)))}
