"""The algorithm: group advantages and the clipped policy-gradient token loss. Change a loss here.

Plain functions, no state. Formulas are in docs/algorithms.md ("Advantages", "The clipped policy loss"); the
importance weights, their ESS and OPOB live in ``algo/offpolicy.py``.

- advantages: ``grpo`` (R - mean_g) / (std_g + eps); ``rloo`` R_i - mean_{j!=i} R_j; ``drgrpo`` R - mean_g
  (no std division; pair it with the constant normaliser below); ``opob`` (R - b*) / std_g with VCPO's
  off-policy optimal baseline (computed by the actor: it needs per-trajectory gradient norms).
- token loss: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) (PPO-clip; DAPO clip-higher is
  eps_high > eps_low), times an importance weight, plus beta * k3 KL to the reference.
  ``old_logprobs="rollout"``: r = π_θ / μ against the rollout's logprobs; the clip bounds how far an
  off-policy sample can push, and there is no separate weight. ``"recompute"``: r = π_θ / π_prox (the
  proximal policy: AReaL's decoupled form; with one optimizer step per batch π_prox = sg(π_θ), with
  several it is the policy at the version's start, scored once) and the off-policy gap is carried by
  the weight π_prox / μ: truncated (``tis``), masked (``mis``) or plain
  (``none``), per token or per sequence (``correction_level``).
- ``ratio_level="sequence"`` is GSPO: r_i = exp(mean_t log(π_θ / π_old)) for every token of sample i
  (pair it with a clip range of a few 1e-4).
- aggregation returns an un-normalised *sum* and its normaliser count, so a step can accumulate
  chunks as they stream in and divide once at the end: the gradient then equals the one computed on
  the whole batch at once (the k = 0 equivalence the actor relies on).
"""

from __future__ import annotations

import torch

from rlflow.algo.choices import ADVANTAGES, AGGREGATIONS, OLD_LOGPROBS, RATIO_LEVELS
from rlflow.algo.offpolicy import importance_weights

EPS = 1e-6


def group_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """[G] rewards of one group -> [G] advantages (``opob`` needs weights: see offpolicy.opob_advantages)."""
    g = rewards.numel()
    if kind == "grpo":
        return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + EPS) if g > 1 else torch.zeros_like(rewards)
    if kind == "rloo":
        return rewards - (rewards.sum() - rewards) / (g - 1) if g > 1 else torch.zeros_like(rewards)
    if kind == "drgrpo":
        return rewards - rewards.mean()
    raise ValueError(f"actor.advantage={kind!r}: choose one of {ADVANTAGES}")


def policy_loss(logp: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                *, clip_low: float, clip_high: float, old_logprobs: str, ratio_level: str = "token",
                correction: str = "none", correction_level: str = "token", is_cap: float = 2.0,
                kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None,
                prox_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, T] (zero where ``mask`` is 0) and per-token diagnostics [B, T].

    logp: [B, T] log π_θ (differentiable); rollout_logp: [B, T] log μ; advantages: [B]; mask: [B, T] 0/1;
    prox_logp: [B, T] log π_prox, the policy at the version's start, for ``recompute`` when a version
    takes several optimizer steps (None: π_θ itself, exact with one step per version).
    Diagnostics: clip_frac, ratio, approx_kl (k3 of the old policy against π_θ: how far the update
    moved), is_weight, is_cut (weight truncated or masked), rollout_kl (k3 of μ against π_θ), kl (k3 to
    the reference, with a KL term).
    """
    # Log-ratios are zeroed where the mask is 0 before anything is exponentiated: a masked-out token
    # (padding, an episode's observation) then has ratio 1 and weight 1 whatever it carries, so it adds
    # exactly 0 to the loss and the gradient (0 x inf would be NaN).
    behaviour = (logp.detach() - rollout_logp) * mask  # log π_θ/μ per token
    if old_logprobs == "rollout":
        if correction != "none":
            raise ValueError(f"actor.correction={correction!r} needs actor.old_logprobs=recompute: with "
                             f"'rollout' the ratio π/μ is already the importance weight")
        log_ratio = (logp - rollout_logp) * mask
        weight, cut = torch.ones_like(logp), torch.zeros_like(logp)
    elif old_logprobs == "recompute":
        prox = logp.detach() if prox_logp is None else prox_logp
        log_ratio = (logp - prox) * mask
        weight, cut = importance_weights((prox - rollout_logp) * mask, mask, correction, correction_level, is_cap)
    else:
        raise ValueError(f"actor.old_logprobs={old_logprobs!r}: choose one of {OLD_LOGPROBS}")
    if ratio_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(mask)
    elif ratio_level != "token":
        raise ValueError(f"actor.ratio_level={ratio_level!r}: choose one of {RATIO_LEVELS}")
    ratio = torch.exp(log_ratio)
    a = advantages[:, None]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(-a * ratio, -a * clipped) * weight
    x = (-behaviour).clamp(max=50.0)  # log μ/π; the clamp keeps a degenerate token's diagnostic finite
    stats = {"clip_frac": ((ratio - clipped).abs() > 0).float(), "ratio": ratio.detach(),
             "approx_kl": (ratio - 1.0 - log_ratio).detach(), "is_weight": weight,
             "is_cut": cut, "rollout_kl": torch.exp(x) - x - 1.0}
    if kl_coef > 0.0:
        assert ref_logp is not None, "a KL term needs ref_logprobs"
        log_r = (ref_logp - logp) * mask
        k3 = torch.exp(log_r) - log_r - 1.0
        loss = loss + kl_coef * k3
        stats["kl"] = k3.detach()
    return loss * mask, stats


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """(un-normalised sum, normaliser contribution) of a chunk; the step divides the sums by the total.

    token_mean: every token of the batch weighs the same (DAPO). seq_mean: each sample's mean over its
    tokens, averaged over samples. constant: sum / (samples * max_new_tokens) (Dr.GRPO).
    """
    if how == "token_mean":
        return token_loss.sum(), float(mask.sum())
    if how == "seq_mean":
        return (token_loss.sum(1) / mask.sum(1).clamp(min=1)).sum(), float(token_loss.shape[0])
    if how == "constant":
        return token_loss.sum(), float(token_loss.shape[0] * max_new_tokens)
    raise ValueError(f"actor.aggregation={how!r}: choose one of {AGGREGATIONS}")
