"""Importance weights, ESS, the VCPO learning-rate rule and OPOB (algo/offpolicy.py)."""

import math

import pytest
import torch

from rlflow.algo.offpolicy import ess, importance_weights, lr_factor, opob_advantages, sequence_log_weights


def naive_ess(w: torch.Tensor) -> float:
    return float(w.sum() ** 2 / (w ** 2).sum())


@pytest.mark.parametrize("b", [1, 2, 16, 1000])
@pytest.mark.parametrize("log_scale", [-300.0, 0.0, 300.0])
def test_ess_equals_the_batch_size_for_equal_weights(b, log_scale):
    assert ess(torch.full((b,), log_scale)) == pytest.approx(b, rel=1e-9)


def test_ess_tends_to_one_as_one_weight_dominates():
    values = []
    for t in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0):
        log_w = torch.zeros(64)
        log_w[7] = t
        values.append(ess(log_w))
    assert values[0] == pytest.approx(64) and all(a > b for a, b in zip(values[:4], values[1:5]))
    assert values[-2] == pytest.approx(1.0, abs=1e-12) and values[-1] == pytest.approx(1.0, abs=1e-12)
    assert min(values) >= 1.0


def test_log_space_ess_agrees_with_the_naive_formula_and_stays_finite_where_it_overflows():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        log_w = torch.randn(32, generator=g, dtype=torch.float64) * 3
        assert ess(log_w) == pytest.approx(naive_ess(torch.exp(log_w)), rel=1e-9)
    big = torch.randn(32, generator=g) * 3 + 200.0  # sequence log weights of long responses: exp() overflows
    assert not math.isfinite(naive_ess(torch.exp(big)))
    assert ess(big) == pytest.approx(naive_ess(torch.exp(big.double() - 200.0)), rel=1e-6)
    assert 1.0 <= ess(big) <= 32


def test_sequence_log_weights_sum_the_masked_token_log_ratios():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mu = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = sequence_log_weights(logp, mu, mask)
    assert torch.allclose(out, torch.tensor([0.5, 0.25])) and not out.requires_grad


def test_the_lr_factor_follows_its_rule_never_exceeds_one_and_has_no_floor():
    assert lr_factor(1.0, "sqrt", 1.0) == 1.0 and lr_factor(0.9, "sqrt", 0.5) == 1.0
    assert lr_factor(0.25, "sqrt", 1.0) == pytest.approx(0.5)
    assert lr_factor(0.25, "linear", 1.0) == pytest.approx(0.25)
    assert lr_factor(0.275, "sqrt", 0.55) == pytest.approx(math.sqrt(0.5))
    assert lr_factor(1e-8, "linear", 1.0) == pytest.approx(1e-8)
    with pytest.raises(ValueError, match="vcpo_rule"):
        lr_factor(0.5, "cubic", 1.0)


def test_truncation_caps_masking_rejects_and_sequence_weights_are_shared_by_their_tokens():
    log_ratio = torch.log(torch.tensor([[0.25, 1.0, 4.0], [1.5, 1.5, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, hit = importance_weights(log_ratio, mask, "tis", "token", cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.25, 1.0, 2.0], [1.5, 1.5, 0.0]]))
    assert hit.tolist() == [[0, 0, 1], [0, 0, 0]]
    w, hit = importance_weights(log_ratio, mask, "mis", "token", cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.0], [1.5, 1.5, 0.0]]))
    assert hit.tolist() == [[1, 0, 1], [0, 0, 0]]
    w, hit = importance_weights(log_ratio, mask, "tis", "sequence", cap=8.0)  # products 1.0 and 2.25
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 1.0], [2.25, 2.25, 0.0]]))
    w, hit = importance_weights(log_ratio, mask, "tis", "sequence", cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])) and hit.tolist() == [[0, 0, 0], [1, 1, 0]]


# A K-armed bandit with a softmax policy π(θ); samples come from a stale μ. The score of arm a is
# e_a - π, so ‖∇log π(a)‖² = 1 - 2π(a) + Σπ². The estimator of ∇ E_π[R] from one group of G samples is
# (1/G) Σ_i w_i A_i (e_{a_i} - π) with w_i = π(a_i) / μ(a_i).
K, G = 4, 8
PI = torch.softmax(torch.tensor([1.0, 0.0, -0.5, 0.3], dtype=torch.float64), 0)
MU = torch.softmax(torch.tensor([-0.5, 1.0, 0.5, -0.3], dtype=torch.float64), 0)  # stale: far from π
MEAN_REWARD = torch.tensor([6.0, 5.0, 4.5, 5.5], dtype=torch.float64)  # a large common offset
TRUE_GRAD = PI * (MEAN_REWARD - (PI * MEAN_REWARD).sum())  # ∇_θ Σ π(a) R(a) for a softmax


def bandit_gradients(baseline: str, groups: int, seed: int, g: int = G) -> torch.Tensor:
    """[groups, K] one gradient estimate per group of ``g`` samples drawn from μ."""
    gen = torch.Generator().manual_seed(seed)
    arms = torch.multinomial(MU.expand(groups, K), g, replacement=True, generator=gen)  # [N, g]
    rewards = MEAN_REWARD[arms] + torch.randn(groups, g, generator=gen, dtype=torch.float64)
    log_w = torch.log(PI[arms]) - torch.log(MU[arms])
    grad_sq = 1 - 2 * PI[arms] + (PI ** 2).sum()
    score = torch.nn.functional.one_hot(arms, K).double() - PI  # [N, g, K]
    if baseline == "opob":
        adv = opob_advantages(rewards, log_w, grad_sq, normalise=False)
    elif baseline == "group_mean":
        adv = rewards - rewards.mean(1, keepdim=True)
    else:
        adv = rewards
    return ((torch.exp(log_w) * adv)[..., None] * score).mean(1)  # [N, K]


def test_the_opob_baseline_leaves_the_expected_gradient_unchanged():
    for baseline in ("opob", "none"):  # the baseline-free estimator is the unbiased reference
        grads = bandit_gradients(baseline, 40_000, seed=1)
        mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
        assert ((mean - TRUE_GRAD).abs() < 4 * stderr + 1e-4).all(), (baseline, mean, TRUE_GRAD, stderr)


def test_opob_lowers_the_gradient_variance_below_the_group_mean_under_stale_samples():
    """Measured on this bandit (40k groups): total variance at G = 8 / 16 / 32 is 0.220 / 0.120 / 0.063
    with the group mean and 0.299 / 0.118 / 0.051 with leave-one-out OPOB. At small G the baseline,
    estimated from G - 1 heavy-tailed weights, is itself too noisy to pay: the win needs G >~ 16."""
    opob = bandit_gradients("opob", 20_000, seed=2, g=32).var(0).sum()
    mean = bandit_gradients("group_mean", 20_000, seed=2, g=32).var(0).sum()
    none = bandit_gradients("none", 20_000, seed=2, g=32).var(0).sum()
    assert opob < 0.9 * mean < 0.9 * none, (float(opob), float(mean), float(none))


def test_opob_reduces_to_the_leave_one_out_mean_for_equal_weights_and_norms():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = opob_advantages(r, torch.zeros(4), torch.ones(4), normalise=False)
    assert torch.allclose(adv, r - (r.sum() - r) / 3)
