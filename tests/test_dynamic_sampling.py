"""Dynamic sampling (data.filter_groups): groups without signal are dropped and replaced, and the ledger
still accounts for every issued sample (issued = trained + filtered)."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from conftest import G, GROUPS, SAMPLING
from helpers import metrics, rlflow, said
from rlflow.algo.filters import rewards_differ
from rlflow.algo.step import StepAccumulator
from rlflow.engines.hf import HFTrainEngine
from rlflow.roles import schema
from rlflow.roles.actor import ActorConfig

FILTER = ["data.filter_groups=true", "reward.fn=user_code.reward_varying_on_thirds"]


def _gradient(tiny_model, client, samples: dict, keep_group=None, drop_uniform_groups=False):
    cfg = ActorConfig(micro_batch=64, drop_uniform_groups=drop_uniform_groups)
    client.declare(schema.COLUMNS, release_after=schema.RELEASE_AFTER)
    client.put(samples)
    engine = HFTrainEngine(tiny_model, cfg, SAMPLING)
    acc = StepAccumulator(engine, cfg, SAMPLING.max_new_tokens, keep_group=keep_group)
    groups = len(set(samples["group_id"]))
    while acc.groups < groups:
        acc.add(client.get("actor", schema.ACTOR_INPUT, n=groups, groups=True, timeout=10).table)
    return acc, {name: p.grad.clone() for name, p in engine.model.named_parameters()}


@pytest.mark.parametrize("drop_uniform_groups", [False, True])  # the filter comes first: uniform groups are replaced
def test_a_filtered_group_adds_nothing_to_the_step_and_is_counted_as_filtered(tiny_model, reverse_samples, client,
                                                                               drop_uniform_groups):
    s = reverse_samples
    for i in range(G):  # groups 0 and 3: every sample the same reward
        s["reward"][i], s["reward"][3 * G + i] = 1.0, 0.0
    acc, grad = _gradient(tiny_model, client, s, keep_group=rewards_differ, drop_uniform_groups=drop_uniform_groups)
    assert acc.filtered_groups == 2 and sorted(acc.filtered_uids) == sorted(s["uid"][:G] + s["uid"][3 * G:4 * G])
    assert set(acc.filtered_uids) <= set(acc.skipped_uids) and not set(acc.filtered_uids) & set(acc.trained_uids)
    metrics_ = acc.finish()
    assert metrics_["filter/groups"] == 2 and metrics_["samples/trained"] == (GROUPS - 2) * G
    # the same step over the kept groups alone: the same gradient (a filtered group adds exactly nothing)
    kept = [i for i in range(GROUPS * G) if i // G not in (0, 3)]
    alone = {k: [v[i] for i in kept] for k, v in s.items()}
    client.clear(everything=True)
    _, expected = _gradient(tiny_model, client, alone)
    for name, g in expected.items():
        assert torch.allclose(grad[name], g, rtol=1e-5, atol=1e-8), name


def _records_of(groups_by_step: list[list[str]]) -> dict[str, dict]:
    """Every consumed group's record, replayed: g<i> is the main stream's i-th, r<s>.<j> the replacement
    stream's next in the order replacements were issued (by step, then j)."""
    import itertools

    from rlflow.flow.config import DataConfig
    from rlflow.flow.data import REPLACEMENT_STREAM, prompt_records
    from rlflow.flow.feeder import group_index, logical_group

    ids = {logical_group(g) for step in groups_by_step for g in step}
    main = list(itertools.islice(prompt_records(DataConfig(), None), max(group_index(g) or 0 for g in ids) + 1))
    replacements = sorted((g for g in ids if g.startswith("r")), key=lambda g: tuple(map(int, g[1:].split("."))))
    stream = prompt_records(DataConfig(), None, REPLACEMENT_STREAM)
    out = {g: next(stream) for g in replacements}
    out.update({g: main[group_index(g)] for g in ids if g.startswith("g")})
    return out


def test_dynamic_sampling_trains_only_groups_with_signal_and_every_issued_sample_is_trained_or_filtered(
        tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *FILTER, "flow.steps=8", "data.filter_budget=10")  # never runs out here
    assert r.returncode == 0, said(r)
    rows = metrics(run_dir)
    assert all(m["samples/trained"] == 4 * 4 and m["filter/exhausted"] == 0 for m in rows)  # 4 groups of 4 a step
    assert all(m["filter/replacements"] == m["filter/groups"] for m in rows)  # one replacement per filtered group
    frac = sum(m["filter/groups"] for m in rows) / sum(m["filter/groups"] + 4 for m in rows)
    assert 0.45 < frac < 0.85, frac  # about 2 in 3 numbers give every sample the same reward
    ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert ledger["issued"] == ledger["trained"] + ledger["filtered"] and ledger["skipped"] == ledger["filtered"]
    assert ledger["consumed_more_than_once"] == ledger["issued_not_consumed"] == ledger["consumed_not_issued"] == 0
    assert ledger["filtered"] == 4 * sum(m["filter/groups"] for m in rows)
    # never trains a group without signal: every trained group's number is divisible by 3
    state = json.loads((run_dir / "checkpoints" / "final" / "trainer_state.json").read_text())
    records = _records_of(state["groups_by_step"])
    filtered = {u.partition("@")[0].rpartition("-")[0] for step in state["filtered_by_step"] for u in step}
    trained = [g for step in state["groups_by_step"] for g in (x.partition("@")[0] for x in step) if g not in filtered]
    assert len(trained) == 8 * 4 and all(int(records[g]["answer"]) % 3 == 0 for g in trained)
    assert any(g.startswith("r") for g in trained)  # replacements trained too


def test_a_step_whose_budget_runs_out_trains_the_groups_it_kept(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *FILTER, "data.filter_budget=0.25", "flow.steps=4")
    assert r.returncode == 0, said(r)
    rows = metrics(run_dir)
    assert all(m["filter/replacements"] <= 1 for m in rows)  # 0.25 x 4 groups
    assert any(m["filter/exhausted"] == 1 and m["samples/trained"] < 16 for m in rows)
    ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert ledger["issued"] == ledger["trained"] + ledger["filtered"] and ledger["issued_not_consumed"] == 0


def test_a_trainer_killed_under_dynamic_sampling_rewinds_and_each_sample_is_consumed_once(tmp_path, model_cache):
    from test_fault_tolerance import run_and_signal

    run_dir = tmp_path / "run"
    r, _ = run_and_signal(run_dir, model_cache, "actor-0", signal.SIGKILL, 5, *FILTER, "actor.checkpoint_every=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [m["step"] for m in metrics(run_dir)][-1] == 16
    summary = json.loads((run_dir / "summary.json").read_text())
    [restart] = summary["supervision"]["restarts"]
    assert restart["replica"] == "actor-0" and "rewound_to" in restart  # replacements of lost steps asked again
    ledger = summary["samples"]
    assert ledger["issued"] == ledger["trained"] + ledger["filtered"] and ledger["filtered"] > 0
    assert ledger["consumed_more_than_once"] == ledger["issued_not_consumed"] == ledger["consumed_not_issued"] == 0


def test_dynamic_sampling_settings_that_cannot_work_are_refused_naming_the_field():
    from rlflow.errors import ConfigError
    from rlflow.flow.config import DataConfig, RunConfig

    with pytest.raises(ConfigError, match=r"data.filter_budget.*must be > 0"):
        DataConfig(filter_budget=0).check()
    cfg = RunConfig()
    cfg.data.filter_groups, cfg.flow.staleness = True, None  # replacements need the step bound
    with pytest.raises(ConfigError, match=r"data.filter_groups.*set flow.staleness"):
        cfg.check()
