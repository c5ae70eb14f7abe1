"""The algorithm's formulas (docs/algorithms.md): advantages, the clipped token loss, the KL term, aggregation."""

from __future__ import annotations

import pytest
import torch

from rlflow.algo.loss import aggregate, group_advantages, policy_loss


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
    args = dict(clip_low=0.2, clip_high=0.28, old_logprobs="rollout")
    args.update(kw)
    return policy_loss(torch.tensor([[logp]], requires_grad=True), torch.tensor([[mu]]), torch.tensor([adv]),
                       torch.ones(1, 1), **args)


def test_on_policy_loss_gradient_is_the_policy_gradient():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.0]]), torch.tensor([2.0]), torch.ones(1, 1),
                          clip_low=0.2, clip_high=0.28, old_logprobs="rollout")
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0]]))  # d(-A r)/dlogp at r = 1


def test_clip_higher_stops_the_gradient_beyond_one_plus_eps_high():
    ratio_up = torch.log(torch.tensor(1.3))  # r = 1.3 > 1 + 0.28 with a positive advantage: clipped
    loss, stats = _loss(float(ratio_up) - 1.0, -1.0, 1.0)
    assert float(stats["clip_frac"]) == 1.0
    loss, stats = _loss(float(torch.log(torch.tensor(1.25))) - 1.0, -1.0, 1.0)  # r = 1.25 < 1.28: not clipped
    assert float(stats["clip_frac"]) == 0.0


def test_recompute_mode_weights_tokens_by_the_truncated_behaviour_ratio():
    _, stats = _loss(-1.0, -1.0 - 2.0, 1.0, old_logprobs="recompute", correction="tis", is_cap=2.0)  # π/μ = e² > 2
    assert float(stats["is_weight"]) == pytest.approx(2.0)
    _, stats = _loss(-1.0, -1.0 - 0.5, 1.0, old_logprobs="recompute", correction="tis", is_cap=2.0)
    assert float(stats["is_weight"]) == pytest.approx(float(torch.exp(torch.tensor(0.5))), rel=1e-5)


def test_k3_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp, mu, mask, adv = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2), torch.zeros(1)
    common = dict(clip_low=0.2, clip_high=0.2, old_logprobs="rollout", kl_coef=0.1)
    _, same = policy_loss(logp, mu, adv, mask, ref_logp=logp.clone(), **common)
    _, other = policy_loss(logp, mu, adv, mask, ref_logp=logp - 0.5, **common)
    assert float(same["kl"].abs().max()) == 0.0 and float(other["kl"].min()) > 0.0


def test_aggregations_return_the_right_normaliser():
    token_loss, mask = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0, 0]])
    assert aggregate(token_loss, mask, "token_mean", 3) == (pytest.approx(4.0), 3.0)
    total, n = aggregate(token_loss, mask, "seq_mean", 3)
    assert (float(total), n) == (pytest.approx(3.0), 2.0)
    assert aggregate(token_loss, mask, "constant", 3)[1] == 6.0


def _batch():
    """Two samples of three tokens (the second has two): log π, log μ, advantages, mask."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 0.0]], requires_grad=True)
    mu = torch.tensor([[-1.0, -2.5, -0.5], [-2.3, -1.0, 0.0]])  # sequence log π/μ: 0.5 and 2.0
    return logp, mu, torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_sequence_tis_gives_every_token_its_sequences_truncated_weight():
    logp, mu, adv, mask = _batch()
    _, stats = policy_loss(logp, mu, adv, mask, clip_low=0.2, clip_high=0.28, old_logprobs="recompute",
                           correction="tis", correction_level="sequence", is_cap=4.0)
    e = torch.exp(torch.tensor(0.5))
    assert torch.allclose(stats["is_weight"], torch.tensor([[e, e, e], [4.0, 4.0, 0.0]]))
    assert stats["is_cut"].tolist() == [[0, 0, 0], [1, 1, 0]]


def test_a_masked_sequence_contributes_neither_loss_nor_gradient():
    logp, mu, adv, mask = _batch()
    loss, stats = policy_loss(logp, mu, adv, mask, clip_low=0.2, clip_high=0.28, old_logprobs="recompute",
                              correction="mis", correction_level="sequence", is_cap=4.0)  # e² > 4: masked
    loss.sum().backward()
    assert loss[1].abs().sum() == 0 and logp.grad[1].abs().sum() == 0
    assert logp.grad[0].abs().sum() > 0 and stats["is_cut"][1].tolist() == [1, 1, 0]


def test_gspo_ratio_is_the_geometric_mean_over_the_sequence_and_shares_its_gradient():
    logp, mu, adv, mask = _batch()
    loss, stats = policy_loss(logp, mu, adv, mask, clip_low=1.0, clip_high=10.0, old_logprobs="rollout",
                              ratio_level="sequence")
    s0, s1 = torch.exp(torch.tensor(0.5 / 3)), torch.exp(torch.tensor(2.0 / 2))
    assert torch.allclose(stats["ratio"], torch.tensor([[s0, s0, s0], [s1, s1, s1]]))
    loss.sum().backward()  # d(-A s T_i)/d logp_t = -A s (every token of sample i gets the same share)
    assert torch.allclose(logp.grad, torch.tensor([[-s0, -s0, -s0], [s1, s1, 0.0]]), atol=1e-6)


def test_weights_on_top_of_the_rollout_ratio_are_refused():
    logp, mu, adv, mask = _batch()
    with pytest.raises(ValueError, match="old_logprobs=recompute"):
        policy_loss(logp, mu, adv, mask, clip_low=0.2, clip_high=0.28, old_logprobs="rollout", correction="tis")


def test_the_rollout_kl_is_k3_of_mu_against_pi_per_token():
    logp, mu, adv, mask = _batch()
    _, stats = policy_loss(logp, mu, adv, mask, clip_low=0.2, clip_high=0.28, old_logprobs="rollout")
    x = (mu - logp.detach()) * mask
    assert torch.allclose(stats["rollout_kl"] * mask, (torch.exp(x) - x - 1) * mask)
    assert float(stats["rollout_kl"][0, 0]) == 0.0 and float(stats["rollout_kl"][1, 0]) > 0


def test_every_name_a_config_may_choose_has_an_implementation_and_no_other_name_does():
    from rlflow.algo import choices
    from rlflow.algo.offpolicy import importance_weights, lr_factor

    logp, mu, adv, mask = torch.zeros(2, 3), torch.full((2, 3), -0.1), torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    for kind in choices.ADVANTAGES:
        if kind != "opob":  # OPOB needs gradient norms: algo/offpolicy.opob_advantages, tests/test_offpolicy.py
            group_advantages(torch.tensor([1.0, 0.0]), kind)
    for how in choices.AGGREGATIONS:
        aggregate(torch.ones(2, 3), mask, how, 3)
    for old in choices.OLD_LOGPROBS:
        for level in choices.RATIO_LEVELS:
            corrections = choices.CORRECTIONS if old == "recompute" else ("none",)
            for correction in corrections:
                for correction_level in choices.LEVELS:
                    policy_loss(logp, mu, adv, mask, clip_low=0.2, clip_high=0.28, old_logprobs=old,
                                ratio_level=level, correction=correction, correction_level=correction_level)
    for rule in choices.LR_RULES:
        assert 0 < lr_factor(0.5, rule, 1.0) < 1
    with pytest.raises(ValueError, match="actor.advantage"):
        group_advantages(torch.tensor([1.0, 0.0]), "ppo")
    with pytest.raises(ValueError, match="actor.aggregation"):
        aggregate(torch.ones(2, 3), mask, "sum", 3)
    with pytest.raises(ValueError, match="actor.correction"):
        importance_weights(logp - mu, mask, "clip", "token", 2.0)
    with pytest.raises(ValueError, match="actor.vcpo_rule"):
        lr_factor(0.5, "cubic", 1.0)
