"""In-flight weight updates (rollout.update=in_flight): a new policy version applied between decode steps.

Each token records the version whose logits it was sampled from; under kv_after_update=recompute its
logprob is exactly that policy's on the sequence so far, and a whole run keeps every token within the
staleness bound.
"""

from __future__ import annotations

import dataclasses
import signal

import pytest
import torch

from helpers import metrics, rlflow, said
from rlflow.engines.base import SamplingParams
from rlflow.engines.hf import HFRolloutEngine, load_model, load_parameters, sequence_logprobs
from rlflow.roles.config import RolloutConfig

ROLLOUT = RolloutConfig(update="in_flight", seed=5)
UPDATES_AT = {1: 1, 3: 2}  # between() call -> the version it applies (after the 1st and the 3rd token)


def _prompts(tiny_model: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return [tok(f"{k}=")["input_ids"] for k in range(100, 100 + n)]


def _generate_across_updates(tiny_model: str, kv: str):
    """Generate with versions 1 and 2 applied mid-sequence; returns (generations, the weights of each version)."""
    engine = HFRolloutEngine(tiny_model, dataclasses.replace(ROLLOUT, kv_after_update=kv))
    torch.manual_seed(0)
    versions = {0: {k: t.clone() for k, t in engine.tensors().items()}}
    for v in (1, 2):  # each version a perturbation of the one before, large enough to move every logprob
        versions[v] = {k: t + torch.randn_like(t) * 0.05 for k, t in versions[v - 1].items()}
    calls = []

    def between(running: int):
        calls.append(engine.version)
        if len(calls) in UPDATES_AT:
            v = UPDATES_AT[len(calls)]
            engine.load_weights(versions[v], v)

    gens = engine.generate(_prompts(tiny_model, 16), SamplingParams(max_new_tokens=16), between=between)
    return gens, versions


def _logprobs_under(tiny_model: str, weights: dict, prompts: list[list[int]], responses: list[list[int]]):
    model = load_model(tiny_model, "float32", "cpu")
    load_parameters(model, weights)
    with torch.no_grad():
        return sequence_logprobs(model, prompts, responses, 1.0, "cpu")


def _by_version(tiny_model, gens, versions):
    """For every version, each token's recorded logprob and that version's recomputed one (tokens it made)."""
    prompts = _prompts(tiny_model, len(gens))
    out = {}
    for v, weights in versions.items():
        again = _logprobs_under(tiny_model, weights, prompts, [g.response_ids for g in gens])
        pairs = [(g.logprobs[t], float(again[i, t])) for i, g in enumerate(gens)
                 for t, tv in enumerate(g.token_versions) if tv == v]
        out[v] = torch.tensor(pairs)
    return out


def test_a_sequence_generated_across_updates_carries_each_token_s_version_and_that_policy_s_logprob(tiny_model):
    gens, versions = _generate_across_updates(tiny_model, "recompute")
    expected = [0, 1, 1, 2]  # sampled from the prefill's logits, then after the 1st and the 3rd between()
    for g in gens:
        assert g.version == 0 and len(g.token_versions) == len(g.response_ids) == len(g.logprobs)
        assert g.token_versions == (expected + [2] * 16)[: len(g.response_ids)]
    assert sum(len(set(g.token_versions)) == 3 for g in gens) >= 4  # several sequences span all three versions
    pairs = _by_version(tiny_model, gens, versions)
    for v, p in pairs.items():
        assert len(p) > 0
        assert torch.allclose(p[:, 0], p[:, 1], atol=1e-5), (v, (p[:, 0] - p[:, 1]).abs().max())
    # and the versions are told apart: version 2's tokens are not version 0's policy
    again = _logprobs_under(tiny_model, versions[0], _prompts(tiny_model, len(gens)), [g.response_ids for g in gens])
    late = torch.tensor([(g.logprobs[t], float(again[i, t])) for i, g in enumerate(gens)
                         for t, tv in enumerate(g.token_versions) if tv == 2])
    assert (late[:, 0] - late[:, 1]).abs().max() > 1e-2


def test_keeping_the_kv_cache_across_an_update_samples_from_a_mix_of_versions(tiny_model):
    """kv_after_update=keep saves the recompute pass, at a price the docs state: tokens before the first
    update are still exactly version 0's, but later ones attend to keys and values older weights computed."""
    gens, versions = _generate_across_updates(tiny_model, "keep")
    pairs = _by_version(tiny_model, gens, versions)
    assert torch.allclose(pairs[0][:, 0], pairs[0][:, 1], atol=1e-5)
    later = torch.cat([pairs[1], pairs[2]])
    assert (later[:, 0] - later[:, 1]).abs().max() > 1e-3


def test_continuous_decoding_hands_each_sequence_over_as_it_ends_and_takes_prompts_mid_call(tiny_model):
    """between() may return prompts, which join the same call; each sequence is handed to finished() the
    step it ends; the batch never holds more than max_batch; rows join and leave the KV cache without a
    recompute, and every logprob is still the policy's."""
    engine = HFRolloutEngine(tiny_model, dataclasses.replace(ROLLOUT, max_batch=8))
    prompts = _prompts(tiny_model, 30)
    first, later = prompts[:12], prompts[12:]  # 12 > max_batch: 4 wait from the start
    rows: list[int] = []
    prefill = engine._prefill
    engine._prefill = lambda seqs, at: (rows.append(len(seqs)), prefill(seqs, at))[1]  # observe each prefill's rows
    calls: list[int] = []
    handed: dict[int, tuple] = {}

    def between(running: int):
        calls.append(running)
        return later if len(calls) == 2 else None

    def finished(index, gen):
        assert index not in handed
        handed[index] = (gen, len(calls))

    returned = engine.generate(first, SamplingParams(max_new_tokens=12), between=between, finished=finished)
    assert sorted(handed) == list(range(30))
    assert returned == [None] * 30  # handed over, so not kept (a call may last a whole run)
    gens = [handed[i][0] for i in range(30)]
    assert max(rows) <= 8 and len(rows) >= 3  # prompts joined as rows ended
    assert sum(rows) == 30  # spliced into the cache: each sequence prefilled once, none recomputed
    assert calls[0] <= 12 and max(calls) <= 30 and calls[-1] == 0  # running: live and waiting sequences
    # handed over as it ended: the first batch's sequences after their last token's step, not the call's end
    for i in range(8):
        assert handed[i][1] == len(gens[i].response_ids) - 1
    assert min(handed[i][1] for i in range(8)) < max(handed[i][1] for i in range(30))
    assert all(g.token_versions == [0] * len(g.response_ids) for g in gens)
    again = _logprobs_under(tiny_model, {k: t.clone() for k, t in engine.tensors().items()}, prompts,
                            [g.response_ids for g in gens])
    for i, g in enumerate(gens):
        assert torch.allclose(torch.tensor(g.logprobs), again[i, : len(g.logprobs)], atol=1e-5), i


def test_without_between_a_call_runs_at_one_version_and_reports_no_token_versions(tiny_model):
    engine = HFRolloutEngine(tiny_model, RolloutConfig(seed=5))
    gens = engine.generate(_prompts(tiny_model, 4), SamplingParams(max_new_tokens=8))
    assert all(g.token_versions is None and g.version == 0 for g in gens)


def test_in_flight_settings_that_cannot_work_are_refused_naming_the_field(tiny_model):
    from rlflow.errors import ConfigError
    from rlflow.flow.config import RunConfig
    from rlflow.roles.rollout import make_engine

    with pytest.raises(ConfigError, match=r"rollout.update.*choose one of"):
        RolloutConfig(update="mid_flight").check()
    with pytest.raises(ConfigError, match=r"rollout.kv_after_update.*choose one of"):
        RolloutConfig(kv_after_update="drop").check()
    cfg = RunConfig()
    cfg.rollout.update = "in_flight"
    cfg.env.cls = "rlflow.envs.tools.Calculator"
    with pytest.raises(ConfigError, match=r"rollout.update.*episodes.*between turns"):
        cfg.check()
    with pytest.raises(TypeError, match=r"rollout.update=in_flight.*CrashingEngine.generate\(self, prompts, sampling\) "
                                        r"takes no between; set rollout.update=between_calls"):
        make_engine(RolloutConfig(engine="user_code.CrashingEngine", update="in_flight"), tiny_model)


def test_a_run_with_in_flight_updates_keeps_every_token_within_the_staleness_bound(tmp_path, model_cache):
    """Long responses (no stop token) and staleness 1: versions land while the rollout decodes, so some
    samples span two versions, and none spans more or holds a token staler than the bound."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "rollout.engine=user_code.NeverStoppingEngine", "rollout.update=in_flight",
               "rollout.max_new_tokens=32", "flow.staleness=1", "flow.steps=8")
    assert r.returncode == 0, said(r)
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == list(range(1, 9))
    assert all(m["staleness/max"] <= 1 and 1 <= m["rollout/versions_spanned_mean"] <= 2 for m in rows)
    assert all(m["response/length_mean"] == 32 for m in rows)
    assert sum(m["rollout/multi_version_frac"] for m in rows) > 0  # updates did land mid-sequence


def test_a_rollout_killed_mid_generation_is_restarted_and_every_sample_trains_exactly_once(tmp_path, model_cache):
    """Continuous generation holds rows across many groups' puts: a replica killed mid-call hands back the
    rows it had not put, and its successor generates them, each trained once by the run's ledger."""
    from test_fault_tolerance import assert_each_step_once_and_every_sample_trained_once, run_and_signal

    run_dir = tmp_path / "run"
    r, _ = run_and_signal(run_dir, model_cache, "rollout-0", signal.SIGKILL, 5, "rollout.update=in_flight",
                          "rollout.engine=user_code.NeverStoppingEngine", "rollout.max_new_tokens=24")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_each_step_once_and_every_sample_trained_once(run_dir)
    rows = metrics(run_dir)
    assert all(m["staleness/max"] <= 1 for m in rows) and sum(m["rollout/multi_version_frac"] for m in rows) > 0
