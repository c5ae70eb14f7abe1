"""Staleness 0 is synchronous training: a step streamed group by group off the bus has the gradient of
the whole batch computed at once in one process (docs/algorithms.md, "Streaming steps")."""

from __future__ import annotations


import pytest
import torch

from rlflow.roles import schema
from rlflow.algo.step import StepAccumulator
from rlflow.roles.actor import ActorConfig
from rlflow.engines.hf import HFTrainEngine
from rlflow.algo.loss import aggregate, group_advantages, policy_loss

from conftest import G, GROUPS, SAMPLING


def _whole_batch_gradient(tiny_model, cfg: ActorConfig, s: dict) -> dict[str, torch.Tensor]:
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    rewards = torch.tensor(s["reward"]).view(GROUPS, G)
    adv = torch.cat([group_advantages(rewards[g], cfg.advantage) for g in range(GROUPS)])
    logp = engine.token_logprobs(s["prompt_ids"], s["response_ids"])
    mask, mu = torch.zeros_like(logp), torch.zeros_like(logp)
    for i, lp in enumerate(s["rollout_logprobs"]):
        mask[i, : len(lp)], mu[i, : len(lp)] = 1.0, torch.tensor(lp)
    token_loss, _ = policy_loss(logp, mu, adv, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                old_logprobs=cfg.old_logprobs, ratio_level=cfg.ratio_level, correction=cfg.correction,
                                correction_level=cfg.correction_level, is_cap=cfg.is_cap)
    total, n = aggregate(token_loss, mask, cfg.aggregation, SAMPLING.max_new_tokens)
    (total / n).backward()
    return {name: p.grad.clone() for name, p in engine.model.named_parameters()}


@pytest.mark.parametrize("aggregation,old_logprobs,extra", [
    ("token_mean", "rollout", {}),
    ("seq_mean", "recompute", {"correction": "tis", "correction_level": "sequence", "is_cap": 8.0}),
    ("constant", "rollout", {"ratio_level": "sequence"}),
    ("token_mean", "recompute", {"correction": "mis", "is_cap": 1.5})])
def test_a_step_streamed_off_the_bus_has_the_whole_batch_gradient(tiny_model, reverse_samples, client, aggregation,
                                                                   old_logprobs, extra):
    cfg = ActorConfig(aggregation=aggregation, old_logprobs=old_logprobs, micro_batch=3, **extra)
    s = reverse_samples
    client.declare(schema.COLUMNS, release_after=schema.RELEASE_AFTER)
    client.put(s)
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    deliveries = 0
    while acc.groups < GROUPS:  # one group per delivery, as a slow rollout would stream them in
        acc.add(client.get("actor", schema.ACTOR_INPUT, n=1, groups=True, timeout=10).table)
        deliveries += 1
    assert deliveries == GROUPS
    streamed = {name: p.grad / acc.normaliser for name, p in engine.model.named_parameters()}
    expected = _whole_batch_gradient(tiny_model, cfg, s)
    for name, g in expected.items():
        assert torch.allclose(streamed[name], g, rtol=1e-4, atol=1e-7), name
    assert sum(float(g.abs().sum()) for g in expected.values()) > 0  # a batch with signal, not all-zero


def test_samples_whose_reward_failed_are_left_out_of_the_step(tiny_model, reverse_samples, client):
    cfg = ActorConfig(micro_batch=64)
    s = reverse_samples
    s["reward"][0] = float("nan")
    client.declare(schema.COLUMNS, release_after=schema.RELEASE_AFTER)
    client.put(s)
    acc = StepAccumulator(HFTrainEngine(tiny_model, cfg, SAMPLING), cfg, SAMPLING.max_new_tokens)
    acc.add(client.get("actor", schema.ACTOR_INPUT, n=GROUPS, groups=True, timeout=10).table)
    metrics = acc.finish()
    assert metrics["reward/errors"] == 1 and metrics["samples"] == G * GROUPS
    assert acc.lengths and len(acc.lengths) == G * GROUPS - 1
