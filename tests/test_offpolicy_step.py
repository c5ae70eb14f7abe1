"""The actor's off-policy step on the real tiny model: VCPO's per-step learning rate, the ESS it is
computed from, per-trajectory gradient norms for OPOB, and the corrections' metrics."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from rlflow.algo.step import StepAccumulator
from rlflow.roles.actor import ActorConfig
from rlflow.engines.hf import HFTrainEngine
from conftest import SAMPLING


def _loss(engine: HFTrainEngine, s: dict) -> torch.Tensor:
    return -engine.token_logprobs(s["prompt_ids"], s["response_ids"]).sum()


def test_the_vcpo_factor_scales_only_its_step_and_the_base_lr_is_restored(tiny_model, reverse_samples):
    cfg = ActorConfig(lr=1e-3)
    deltas = {}
    for lr_scale in (1.0, 0.25):
        engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
        before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
        _loss(engine, reverse_samples).backward()
        metrics = engine.step(1.0, lr_scale)
        assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-3] * len(engine.optimizer.param_groups)
        assert metrics["lr/effective"] == pytest.approx(1e-3 * lr_scale)
        deltas[lr_scale] = {n: p.detach() - before[n] for n, p in engine.model.named_parameters()}
    moved = 0
    for name, full in deltas[1.0].items():  # Adam's update is proportional to the rate it is given
        assert torch.allclose(deltas[0.25][name], 0.25 * full, rtol=1e-3, atol=1e-9), name
        moved += int(full.count_nonzero())
    assert moved > 0


def test_the_base_lr_is_restored_when_the_optimizer_step_fails(tiny_model, reverse_samples):
    engine = HFTrainEngine(tiny_model, ActorConfig(lr=1e-3), SAMPLING)
    _loss(engine, reverse_samples).backward()

    def broken(*_, **__):
        raise RuntimeError("optimizer failed")

    engine.optimizer.step = broken
    with pytest.raises(RuntimeError, match="optimizer failed"):
        engine.step(1.0, 0.1)
    assert all(g["lr"] == 1e-3 for g in engine.optimizer.param_groups)


def test_trajectory_grad_sq_is_each_samples_gradient_norm_and_leaves_accumulated_grads_alone(tiny_model,
                                                                                              reverse_samples):
    engine = HFTrainEngine(tiny_model, ActorConfig(), SAMPLING)
    s = {k: v[:3] for k, v in reverse_samples.items()}
    _loss(engine, s).backward()  # a step in progress: its accumulated gradient must survive
    accumulated = {n: p.grad.clone() for n, p in engine.model.named_parameters()}
    grad_sq, seq_logp = engine.trajectory_grad_sq(s["prompt_ids"], s["response_ids"])
    for n, p in engine.model.named_parameters():
        assert torch.equal(p.grad, accumulated[n]), n
    fresh = HFTrainEngine(tiny_model, ActorConfig(), SAMPLING)
    for i in range(3):
        fresh.model.zero_grad(set_to_none=True)
        logp = fresh.token_logprobs(s["prompt_ids"][i: i + 1], s["response_ids"][i: i + 1]).sum()
        logp.backward()
        expected = sum(float(p.grad.double().pow(2).sum()) for p in fresh.model.parameters() if p.grad is not None)
        assert float(grad_sq[i]) == pytest.approx(expected, rel=1e-5) and expected > 0
        assert float(seq_logp[i]) == pytest.approx(float(logp.detach()), rel=1e-5, abs=1e-5)


def _stale_engine(tiny_model, samples: dict, steps: int, cfg: ActorConfig) -> HFTrainEngine:
    """A trainer that took ``steps`` real steps since the rollout's version 0 generated ``samples``."""
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    for _ in range(steps):
        acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
        acc.add(pa.table(samples))
        acc.finish()
    return engine


def _naive_ess_ratio(engine: HFTrainEngine, s: dict) -> float:
    with torch.no_grad():
        logp = engine.token_logprobs(s["prompt_ids"], s["response_ids"]).sum(1).double()
    w = torch.exp(logp - torch.tensor([sum(lp) for lp in s["rollout_logprobs"]], dtype=torch.float64))
    return float(w.sum() ** 2 / (w ** 2).sum()) / w.numel()


@pytest.mark.parametrize("rule", ["sqrt", "linear"])
def test_stale_samples_lower_the_ess_and_vcpo_scales_that_steps_lr_by_its_rule(tiny_model, reverse_samples, rule):
    base = ActorConfig(lr=3e-3, micro_batch=64)
    cfg = ActorConfig(lr=3e-3, micro_batch=64, old_logprobs="recompute", correction="tis",
                      correction_level="sequence", is_cap=8.0, vcpo=True, vcpo_rule=rule, vcpo_ref=1.0)
    engine = _stale_engine(tiny_model, reverse_samples, 4, base)  # version 4 trains on version-0 samples
    expected = _naive_ess_ratio(engine, reverse_samples)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    acc.add(pa.table(reverse_samples))
    m = acc.finish()
    assert m["ess/ratio"] == pytest.approx(expected, rel=1e-4) and m["ess/ratio"] < 0.95
    factor = math.sqrt(m["ess/ratio"]) if rule == "sqrt" else m["ess/ratio"]
    assert m["lr/factor"] == pytest.approx(factor) and m["lr/effective"] == pytest.approx(3e-3 * factor)
    assert engine.optimizer.param_groups[0]["lr"] == 3e-3
    assert m["is/seq_max"] >= m["is/seq_p99"] > 0 and m["is/token_max"] >= m["is/token_p99"] > 0
    assert m["kl/rollout_k3"] > 0 and 0.0 <= m["is/cut_frac"] <= 1.0


def test_on_policy_samples_have_full_ess_and_vcpo_leaves_the_lr_alone(tiny_model, reverse_samples):
    cfg = ActorConfig(micro_batch=64, vcpo=True)
    m = StepAccumulator(engine := HFTrainEngine(tiny_model, cfg, SAMPLING), cfg, SAMPLING.max_new_tokens)
    m.add(pa.table(reverse_samples))
    out = m.finish()
    assert out["ess/ratio"] == pytest.approx(1.0, abs=1e-4) and out["lr/factor"] == pytest.approx(1.0, abs=1e-4)
    assert out["kl/rollout_k3"] == pytest.approx(0.0, abs=1e-5) and out["is/cut_frac"] == 0.0
    assert engine.version == 1


def test_the_cut_fraction_counts_the_tokens_of_a_masked_sequence(tiny_model, reverse_samples):
    s = reverse_samples
    s["rollout_logprobs"][0] = [lp - 5.0 for lp in s["rollout_logprobs"][0]]  # μ far below π: w >> C
    cfg = ActorConfig(micro_batch=64, old_logprobs="recompute", correction="mis", correction_level="sequence",
                      is_cap=4.0)
    acc = StepAccumulator(HFTrainEngine(tiny_model, cfg, SAMPLING), cfg, SAMPLING.max_new_tokens)
    acc.add(pa.table(s))
    m = acc.finish()
    tokens = sum(len(r) for r in s["response_ids"])
    assert m["is/cut_frac"] == pytest.approx(len(s["response_ids"][0]) / tokens)
    assert m["is/seq_max"] == pytest.approx(math.exp(5.0 * len(s["response_ids"][0])), rel=1e-3)


def test_opob_needs_an_engine_with_trajectory_gradients(tiny_model, reverse_samples):
    class NoNorms:
        version = 0

        def token_logprobs(self, prompts, responses):
            raise AssertionError("not reached")

    cfg = ActorConfig(advantage="opob")
    with pytest.raises(TypeError, match="trajectory_grad_sq"):
        StepAccumulator(NoNorms(), cfg, SAMPLING.max_new_tokens).add(pa.table(reverse_samples))


def test_an_opob_step_trains_on_stale_samples(tiny_model, reverse_samples):
    cfg = ActorConfig(lr=3e-3, micro_batch=64, advantage="opob", old_logprobs="recompute", correction="tis",
                      correction_level="sequence", is_cap=8.0, vcpo=True)
    engine = _stale_engine(tiny_model, reverse_samples, 2, ActorConfig(lr=3e-3, micro_batch=64))
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens)
    acc.add(pa.table(reverse_samples))
    m = acc.finish()
    assert math.isfinite(m["loss"]) and m["actor/grad_norm"] > 0 and m["ess/ratio"] < 1.0
    assert any(not torch.equal(p.detach(), before[n]) for n, p in engine.model.named_parameters())
