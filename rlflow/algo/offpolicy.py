"""Off-policy corrections and VCPO: importance weights, their effective sample size, the LR rule, OPOB.

Plain functions over tensors; ``algo/loss.py`` and the actor's step call them. Formulas are in
docs/algorithms.md ("Off-policy corrections", "VCPO"). Notation: μ = the policy that generated a
sample (the rollout's logprobs), π = the policy being trained, log w_i = Σ_t log π(y_t) - log μ(y_t).

Design decisions:
- Everything about the weights is computed in log space: a sequence weight is a product of hundreds of
  token ratios and overflows float32 long before it matters. ``ess`` uses
  log ESS = 2 logsumexp(log w) - logsumexp(2 log w), finite whenever the log weights are.
- Importance weights are constants of the loss (stop-gradient): they reweight samples, they are not
  optimised. Truncation (TIS) caps a weight at C; masking (MIS) drops a token or sequence whose weight
  is outside [1/C, C] (a rejection test), so it neither pushes nor counts.
- The VCPO learning-rate factor is a plain number the actor applies to this step only; ``lr_factor``
  never returns more than 1 and has no lower clamp (the paper's choice: a collapsed ESS should stop the
  step, not be floored into a fixed fraction of it).
- OPOB's baseline for sample i is computed from the *other* samples of its group (leave-one-out), so it
  does not depend on sample i and the policy gradient stays exactly unbiased: E_μ[w ∇log π] = 0.
"""

from __future__ import annotations

import math

import torch

from rlflow.algo.choices import CORRECTIONS, LEVELS, LR_RULES


def sequence_log_weights(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] log w_i = Σ_t mask (log π - log μ): the log of each sequence's importance weight (no gradient)."""
    return ((logp.detach() - rollout_logp) * mask).sum(1)


def ess(log_w: torch.Tensor) -> float:
    """Effective sample size (Σ w)² / Σ w² of weights given by their logs, computed in log space.

    B for equal weights, tending to 1 when one weight dominates; always in [1, B] for B > 0 weights.
    """
    if log_w.numel() == 0:
        return 0.0
    log_w = log_w.double()
    return math.exp(float(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def lr_factor(ess_ratio: float, rule: str, ref: float) -> float:
    """VCPO: multiply the learning rate by sqrt(min(1, ρ / ρ_ref)) (``sqrt``) or min(1, ρ / ρ_ref) (``linear``)."""
    x = min(1.0, ess_ratio / ref)
    if rule == "sqrt":
        return math.sqrt(x)
    if rule == "linear":
        return x
    raise ValueError(f"actor.vcpo_rule={rule!r}: choose one of {LR_RULES}")


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, correction: str, level: str,
                       cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights [B, T] (no gradient) for log π_prox - log μ per token, and [B, T] 0/1 marks of
    the tokens whose weight was truncated (tis) or masked out (mis).

    level ``token``: each token's own ratio; ``sequence``: the product over the sequence, given to each
    of its tokens. ``tis``: min(w, cap); ``mis``: w where 1/cap <= w <= cap, else 0 (``none``: w itself).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"actor.correction={correction!r}: choose one of {CORRECTIONS}")
    log_ratio = log_ratio.detach() * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True).expand_as(mask)
    elif level != "token":
        raise ValueError(f"actor.correction_level={level!r}: choose one of {LEVELS}")
    log_cap = math.log(cap)
    if correction == "tis":
        hit = log_ratio > log_cap
        weight = torch.exp(log_ratio.clamp(max=log_cap))
    elif correction == "mis":
        hit = log_ratio.abs() > log_cap
        weight = torch.exp(log_ratio).masked_fill(hit, 0.0)
    else:
        hit = torch.zeros_like(mask, dtype=torch.bool)
        weight = torch.exp(log_ratio)
    return weight * mask, hit.float() * mask


def opob_advantages(rewards: torch.Tensor, log_w: torch.Tensor, grad_sq: torch.Tensor,
                    normalise: bool = True) -> torch.Tensor:
    """[..., G] advantages of groups (the last dimension) with VCPO's off-policy optimal baseline, leave-one-out.

    b_i = Σ_{j≠i} w_j² g_j R_j / Σ_{j≠i} w_j² g_j, with w_j the sequence importance weight and g_j =
    ‖∇ log π(τ_j)‖²: the baseline that minimises the variance of Σ w (R - b) ∇log π. Falls back to the
    leave-one-out mean where the other samples carry no weight. ``normalise``: divide by the group's
    reward std (GRPO's scale), as VCPO does.

    Why leave-one-out: the in-group b* includes sample i's own reward and weight, which biases the
    gradient in direction, not just size (on the 4-arm bandit of tests/test_offpolicy.py at G = 8 it
    turns one arm's expected gradient from -0.011 to +0.012). The group *mean* has the same flaw in a
    harmless form: R_i - mean = (G-1)/G (R_i - mean_{j≠i}), a shrink of the whole gradient that the
    learning rate absorbs. The price: b_i is estimated from G - 1 heavy-tailed weights, so the variance
    falls below the group mean's only from G ~ 16 on (measured in that test).
    """
    g = rewards.shape[-1]
    if g < 2:
        return torch.zeros_like(rewards)
    log_c = 2 * log_w.double() + torch.log(grad_sq.double().clamp(min=1e-300))
    c = torch.exp(log_c - log_c.amax(-1, keepdim=True))  # w² g, scaled per group: only ratios matter
    r = rewards.double()
    num = (c * r).sum(-1, keepdim=True) - c * r
    den = c.sum(-1, keepdim=True) - c
    loo_mean = (r.sum(-1, keepdim=True) - r) / (g - 1)
    baseline = torch.where(den > 1e-12 * c.sum(-1, keepdim=True), num / den.clamp(min=1e-300), loo_mean)
    adv = r - baseline
    if normalise:
        adv = adv / (r.std(-1, unbiased=True, keepdim=True) + 1e-6)
    return adv.to(rewards.dtype)
