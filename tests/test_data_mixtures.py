"""Data mixtures (data.sources) and saved Hugging Face datasets as data: each prompt drawn from a source in
its weight's proportion, scored by its source's reward, reported per source."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest

from helpers import metrics, rlflow, rlflow_eval, said
from rlflow.errors import ConfigError
from rlflow.flow.config import DataConfig, RunConfig, SourceConfig
from rlflow.flow.data import REPLACEMENT_STREAM, prompt_records, read_prompts


def _mixture(*weights: float, seed: int = 0) -> DataConfig:
    tasks = ["reverse", "sort", "add"]
    return DataConfig(seed=seed, sources=[SourceConfig(name=f"s{i}", task=tasks[i], weight=w) for i, w in enumerate(weights)])


def test_a_mixture_draws_its_sources_in_their_weights_proportions_and_replays_the_same():
    data, n = _mixture(1.0, 2.0, 5.0), 8000
    drawn = Counter(r["data_source"] for r in itertools.islice(prompt_records(data, [None, None, None]), n))
    for i, w in enumerate((1, 2, 5)):
        p = w / 8
        assert abs(drawn[f"s{i}"] - n * p) < 4 * math.sqrt(n * p * (1 - p)), (drawn, i)  # 4 standard deviations
    first = list(itertools.islice(prompt_records(data, [None] * 3), 50))
    assert first == list(itertools.islice(prompt_records(data, [None] * 3), 50))  # seeded: a resume replays it
    assert first != list(itertools.islice(prompt_records(data, [None] * 3, REPLACEMENT_STREAM), 50))


def test_each_source_is_scored_by_its_own_reward_and_reported_on_its_own(tmp_path, model_cache, tiny_model):
    ones = tmp_path / "ones.jsonl"
    ones.write_text("".join(json.dumps({"q": f"{n}=", "answer": str(n)[::-1]}) + "\n" for n in range(100, 140)))
    run_dir = tmp_path / "run"
    sources = f"[{{name:rev,task:reverse}},{{name:ones,path:{ones},prompt_key:q,reward:user_code.reward_one}}]"
    r = rlflow(run_dir, model_cache, f"data.sources={sources}", "flow.steps=10", f"model.path={tiny_model}")
    assert r.returncode == 0, said(r)
    rows = metrics(run_dir)
    ones_samples = sum(m.get("source/ones/samples", 0) for m in rows)
    rev_samples = sum(m.get("source/rev/samples", 0) for m in rows)
    assert ones_samples + rev_samples == sum(m["samples"] for m in rows) == 10 * 16
    assert 10 * 4 <= ones_samples <= 30 * 4  # 40 groups at 1:1, within 3 standard deviations of 20
    assert all(m["source/ones/reward_mean"] == 1.0 for m in rows if "source/ones/samples" in m)
    assert all(m["source/rev/reward_mean"] < 1.0 for m in rows if "source/rev/samples" in m)
    ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert ledger["issued"] == ledger["trained"] == 160 and ledger["issued_not_consumed"] == 0
    refused = rlflow_eval(str(run_dir / "checkpoints" / "final"))  # which source's reward? it asks
    assert refused.returncode == 2 and "data.sources" in said(refused) and "--task or --data" in said(refused)


def test_a_saved_hugging_face_dataset_loads_as_data_with_its_split(tmp_path, model_cache, tiny_model):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"{n}=", "answer": str(n)[::-1], "level": n % 3} for n in range(100, 160)]
    train = datasets.Dataset.from_list(records)
    datasets.DatasetDict({"train": train, "test": train.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "one"))
    assert read_prompts(str(tmp_path / "one"), "prompt").records == records
    assert read_prompts(str(tmp_path / "dd"), "prompt", "test").records == records[:5]
    with pytest.raises(ConfigError, match=r"holds the splits \['train', 'test'\], not 'dev': set data.split"):
        read_prompts(str(tmp_path / "dd"), "prompt", "dev")
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"data.path={tmp_path / 'dd'}", "reward.fn=rlflow.tasks.rewards.positional_match",
               "flow.steps=3", f"model.path={tiny_model}")
    assert r.returncode == 0, said(r)
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3]


def test_mixture_settings_that_cannot_work_are_refused_naming_the_field(tmp_path):
    bad = [(SourceConfig(name="a", task="reverse", weight=0), "data.sources[0].weight"),
           (SourceConfig(name="", task="reverse"), "data.sources[0].name"),
           (SourceConfig(name="a"), "data.sources[0].path"),
           (SourceConfig(name="a", task="nope"), "data.sources[0].task")]
    for source, field in bad:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
            DataConfig(sources=[source]).check()
    with pytest.raises(ConfigError, match=r"source names must differ"):
        DataConfig(sources=[SourceConfig(name="a", task="reverse"), SourceConfig(name="a", task="sort")]).check()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1=", "answer": "1"}) + "\n")
    cfg = RunConfig()
    cfg.data.sources = [SourceConfig(name="f", path=str(data))]
    with pytest.raises(ConfigError, match=r"data.sources\[0\].reward.*needs a reward"):
        cfg.check()
    cfg.data.sources = [SourceConfig(name="t", task="reverse")]
    cfg.actor.checkpoint_every, cfg.eval.every, cfg.eval.data = 5, 5, str(data)
    with pytest.raises(ConfigError, match=r"reward.fn.*periodic evaluation of a mixture"):
        cfg.check()


def test_a_curriculum_passes_over_prompts_it_refuses_given_their_past_rewards(tmp_path, model_cache, tiny_model):
    """data.curriculum=rlflow.algo.filters.unsolved: a prompt every sample of which was rewarded 1 is not
    issued again (here a third of the file: reward_varying_on_thirds gives those 1 whatever the response)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}=", "answer": str(n)[::-1]}) + "\n" for n in range(100, 124)))
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"data.path={data}", "reward.fn=user_code.reward_varying_on_thirds",
               "data.curriculum=rlflow.algo.filters.unsolved", "flow.steps=18",  # 72 groups: 3 epochs of 24 prompts
               f"model.path={tiny_model}")
    assert r.returncode == 0, said(r)
    rows = metrics(run_dir)
    assert sum(m["curriculum/skipped"] for m in rows) >= 8  # the 8 solved prompts, passed over in later epochs
    assert rows[-1]["curriculum/prompts_seen"] == 24
    ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert ledger["issued"] == ledger["trained"] + ledger["skipped"] and ledger["issued_not_consumed"] == 0

    # a curriculum that refuses everything fails the run naming it, instead of spinning for ever
    r = rlflow(tmp_path / "run2", model_cache, f"data.path={data}", "reward.fn=user_code.reward_one",
               "data.curriculum=rlflow.algo.filters.unsolved", "flow.steps=40", f"model.path={tiny_model}")
    assert r.returncode != 0 and "data.curriculum=rlflow.algo.filters.unsolved refused 10000 prompts in a row" in said(r)


def test_a_data_source_field_in_plain_data_stays_a_field(tmp_path, model_cache, tiny_model):
    """Without data.sources a record's data_source is one of its fields (for the reward), whatever its type:
    it never becomes the typed mixture column."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}=", "answer": str(n)[::-1], "data_source": {"n": n}}) + "\n"
                            for n in range(100, 120)))
    r = rlflow(tmp_path / "run", model_cache, f"data.path={data}", "reward.fn=rlflow.tasks.rewards.positional_match",
               "flow.steps=2", f"model.path={tiny_model}")
    assert r.returncode == 0, said(r)
