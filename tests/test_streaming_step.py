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
    streamed = {name: p.grad / acc.total.normaliser for name, p in engine.model.named_parameters()}
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


def test_micro_batches_by_token_budget_give_the_whole_batch_gradient(tiny_model, reverse_samples, client):
    """actor.max_tokens_per_microbatch packs samples longest first under a token budget (padding counted):
    several small passes, the same step gradient as one pass over the whole batch."""
    cfg = ActorConfig(max_tokens_per_microbatch=40)
    s = reverse_samples
    client.declare(schema.COLUMNS, release_after=schema.RELEASE_AFTER)
    client.put(s)
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    passes = []
    engine.token_logprobs = lambda p, r, f=engine.token_logprobs: passes.append(max(map(len, p)) + max(map(len, r))) or f(p, r)
    acc.add(client.get("actor", schema.ACTOR_INPUT, n=GROUPS, groups=True, timeout=10).table)
    assert acc.groups == GROUPS and len(passes) > 3
    streamed = {name: p.grad / acc.total.normaliser for name, p in engine.model.named_parameters()}
    for name, g in _whole_batch_gradient(tiny_model, cfg, s).items():
        assert torch.allclose(streamed[name], g, rtol=1e-4, atol=1e-7), name


def test_token_budget_passes_hold_every_sample_once_and_stay_under_the_budget():
    import random

    from rlflow.algo.step import micro_batches

    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)] + [900]  # one sample longer than the budget
    for padded in (True, False):
        passes = micro_batches(lengths, max_rows=16, max_tokens=1024, padded=padded)
        assert sorted(k for p in passes for k in p) == list(range(len(lengths)))
        for p in passes:
            cost = max(lengths[k] for k in p) * len(p) if padded else sum(lengths[k] for k in p)
            assert len(p) <= 16 and (len(p) == 1 or cost <= 1024)
        assert passes[0] == [500]  # longest first: the memory peak comes at once
    # packed without padding, the same budget holds more samples per pass
    assert len(micro_batches(lengths, 64, 1024, padded=False)) < len(micro_batches(lengths, 64, 1024))
    assert micro_batches([5, 3, 9], max_rows=2) == [[0, 1], [2]]  # no budget: in order, max_rows at a time


def test_padding_free_passes_give_the_padded_gradient(tiny_model, reverse_samples, client):
    """actor.padding_free: each pass one packed row, positions restarting per sample, no padding; the
    step's loss and gradient are those of padded passes."""
    client.declare(schema.COLUMNS, release_after=schema.RELEASE_AFTER)
    client.put(reverse_samples)
    table = client.get("actor", schema.ACTOR_INPUT, n=GROUPS, groups=True, timeout=10).table
    grads, losses = [], []
    for packed in (False, True):
        cfg = ActorConfig(padding_free=packed, max_tokens_per_microbatch=60)
        engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
        acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
        acc.add(table)
        losses.append(acc.total.loss_sum)
        grads.append({name: p.grad.clone() for name, p in engine.model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name, g in grads[0].items():  # float summation order differs: within 1e-5 of each tensor's largest entry
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


def test_a_model_that_lets_packed_samples_see_each_other_is_refused(tiny_model):
    """Packing is only right where the attention keeps samples apart by their restarting positions; a
    model that ignores them is caught at start (here: the real model, its position ids dropped)."""
    from rlflow.engines.hf import load_model, packing_honoured

    model = load_model(tiny_model, "float32", "cpu")

    class IgnoresPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)  # one long sequence: later samples see earlier ones

    assert packing_honoured(model, "cpu")
    assert not packing_honoured(IgnoresPositions(model), "cpu")
