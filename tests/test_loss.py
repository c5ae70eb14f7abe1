"""The algorithm's formulas (ALGORITHMS.md): advantages, the clipped token loss, the KL term, aggregation."""

from __future__ import annotations

import pytest
import torch

from roles.loss import aggregate, group_advantages, policy_loss


def test_grpo_advantages_are_standardised_within_the_group():
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), "grpo")  # mean 0.5, sample std sqrt(1/3)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 * 3 ** 0.5, atol=1e-4)


def test_rloo_baseline_leaves_the_sample_itself_out():
    a = group_advantages(torch.tensor([3.0, 0.0, 0.0]), "rloo")
    assert torch.allclose(a, torch.tensor([3.0, -1.5, -1.5]))


def test_drgrpo_does_not_divide_by_the_std():
    assert torch.allclose(group_advantages(torch.tensor([2.0, 0.0]), "drgrpo"), torch.tensor([1.0, -1.0]))


def test_a_uniform_group_has_zero_advantage():
    for kind in ("grpo", "rloo", "drgrpo"):
        assert torch.count_nonzero(group_advantages(torch.full((4,), 0.7), kind)) == 0


def _loss(logp, mu, adv, **kw):
    args = dict(clip_low=0.2, clip_high=0.28, old_logprobs="rollout", tis_cap=None)
    args.update(kw)
    return policy_loss(torch.tensor([[logp]], requires_grad=True), torch.tensor([[mu]]), torch.tensor([adv]),
                       torch.ones(1, 1), **args)


def test_on_policy_loss_gradient_is_the_policy_gradient():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.0]]), torch.tensor([2.0]), torch.ones(1, 1),
                          clip_low=0.2, clip_high=0.28, old_logprobs="rollout", tis_cap=None)
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0]]))  # d(-A r)/dlogp at r = 1


def test_clip_higher_stops_the_gradient_beyond_one_plus_eps_high():
    ratio_up = torch.log(torch.tensor(1.3))  # r = 1.3 > 1 + 0.28 with a positive advantage: clipped
    loss, stats = _loss(float(ratio_up) - 1.0, -1.0, 1.0)
    assert float(stats["clip_frac"]) == 1.0
    loss, stats = _loss(float(torch.log(torch.tensor(1.25))) - 1.0, -1.0, 1.0)  # r = 1.25 < 1.28: not clipped
    assert float(stats["clip_frac"]) == 0.0


def test_recompute_mode_weights_tokens_by_the_truncated_behaviour_ratio():
    _, stats = _loss(-1.0, -1.0 - 2.0, 1.0, old_logprobs="recompute", tis_cap=2.0)  # π/μ = e² > 2
    assert float(stats["is_weight"]) == pytest.approx(2.0)
    _, stats = _loss(-1.0, -1.0 - 0.5, 1.0, old_logprobs="recompute", tis_cap=2.0)
    assert float(stats["is_weight"]) == pytest.approx(float(torch.exp(torch.tensor(0.5))), rel=1e-5)


def test_k3_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp, mu, mask, adv = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2), torch.zeros(1)
    common = dict(clip_low=0.2, clip_high=0.2, old_logprobs="rollout", tis_cap=None, kl_coef=0.1)
    _, same = policy_loss(logp, mu, adv, mask, ref_logp=logp.clone(), **common)
    _, other = policy_loss(logp, mu, adv, mask, ref_logp=logp - 0.5, **common)
    assert float(same["kl"].abs().max()) == 0.0 and float(other["kl"].min()) > 0.0


def test_aggregations_return_the_right_normaliser():
    token_loss, mask = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0, 0]])
    assert aggregate(token_loss, mask, "token_mean", 3) == (pytest.approx(4.0), 3.0)
    total, n = aggregate(token_loss, mask, "seq_mean", 3)
    assert (float(total), n) == (pytest.approx(3.0), 2.0)
    assert aggregate(token_loss, mask, "constant", 3)[1] == 6.0
