"""The built-in torch/transformers engines on a real tiny checkpoint loaded with from_pretrained."""

from __future__ import annotations

import dataclasses
import random
import warnings
from types import SimpleNamespace

import pytest
import torch

from rlflow.engines.hf import HFRolloutEngine, HFTrainEngine, sequence_logprobs
from rlflow.engines.base import SamplingParams
from rlflow.roles.config import RolloutConfig
from rlflow.tasks.builtin import get_task
from rlflow.sync.weights import SyncConfig, WeightPublisher, WeightReceiver
from rlflow.transfer.channel import ChannelKey
from conftest import SAMPLING
from helpers import CHANNEL_SECRET, REPO

KEY = ChannelKey(CHANNEL_SECRET)

ROLLOUT = RolloutConfig(device="cpu", dtype="float32", max_batch=64, seed=0)
ACTOR = SimpleNamespace(device="cpu", lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, max_grad_norm=1.0)


def _prompts(tiny_model, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok, rng = AutoTokenizer.from_pretrained(tiny_model), random.Random(0)
    return [tok(get_task("reverse").make(rng, 3, 5)["prompt"])["input_ids"] for _ in range(n)]


def test_rollout_logprobs_equal_the_trainers_so_on_policy_ratios_are_one(tiny_model):
    prompts = _prompts(tiny_model, 24)  # different lengths: exercises left padding against right padding
    gens = HFRolloutEngine(tiny_model, ROLLOUT).generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.9))
    trainer = HFTrainEngine(tiny_model, ACTOR, SamplingParams(max_new_tokens=8, temperature=0.9))
    with torch.no_grad():
        logp = trainer.token_logprobs(prompts, [g.response_ids for g in gens])
    for i, g in enumerate(gens):
        assert torch.allclose(logp[i, : len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-4)
        assert float(logp[i, len(g.logprobs):].abs().sum()) == 0.0


def test_kv_cache_generation_matches_full_recomputation(tiny_model):
    prompts = _prompts(tiny_model, 6)
    engine = HFRolloutEngine(tiny_model, ROLLOUT)
    greedy = SamplingParams(max_new_tokens=6, temperature=1e-9)
    for prompt, gen in zip(prompts, engine.generate(prompts, greedy)):
        ids = list(prompt)
        for token in gen.response_ids:  # each cached step picks what a full forward on the sequence picks
            with torch.no_grad():
                expected = int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            assert token == expected
            ids.append(token)


def test_responses_end_at_the_stop_token_or_at_max_new_tokens_with_no_deprecated_api(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers' FutureWarning on `past_key_values`
        gens = HFRolloutEngine(tiny_model, ROLLOUT).generate(_prompts(tiny_model, 32), SamplingParams(max_new_tokens=5))
    for g in gens:
        assert 1 <= len(g.response_ids) <= 5 and len(g.logprobs) == len(g.response_ids)
        assert (g.finish_reason == "stop") == (g.response_ids[-1] == 2)
        assert 2 not in g.response_ids[:-1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_through_the_channel_are_bit_exact_and_carry_their_version(tiny_model, short_dir, dtype):
    trainer = HFTrainEngine(tiny_model, ACTOR, SAMPLING)
    pub = WeightPublisher(f"ipc://{short_dir}/w", SyncConfig(), getattr(torch, dtype), key=KEY)
    rx = WeightReceiver(pub.address, SyncConfig(), key=KEY)
    rollout = HFRolloutEngine(tiny_model, dataclasses.replace(ROLLOUT, dtype=dtype))
    try:
        for version in range(3):  # a snapshot, then two patches
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            pub.publish(version, trainer.weights())
            reports = rx.update(rollout, need=version, timeout=10)
            assert [r["bit_exact"] for r in reports] == [1] and rx.version == rollout.version == version
            for (name, a), (_, b) in zip(trainer.model.named_parameters(), rollout.model.named_parameters()):
                assert torch.equal(a.detach().to(b.dtype), b), name
        assert [r["object"] for r in reports] == ["patch-2"]
    finally:
        rx.close()
        pub.close()


def test_sequence_logprobs_do_not_depend_on_batch_neighbours(tiny_model):
    prompts = _prompts(tiny_model, 4)
    responses = [[5, 6, 2], [7, 2], [8, 9, 10, 2], [2]]
    model = HFTrainEngine(tiny_model, ACTOR, SAMPLING).model
    with torch.no_grad():
        batch = sequence_logprobs(model, prompts, responses, 1.0, "cpu")
        for i in range(4):
            alone = sequence_logprobs(model, prompts[i:i + 1], responses[i:i + 1], 1.0, "cpu")
            assert torch.allclose(batch[i, : len(responses[i])], alone[0], atol=1e-5)


def test_the_tiny_tokenizer_keeps_every_character_whichever_class_loads_it(tiny_model):
    from transformers import AutoTokenizer

    from rlflow.engines.tiny import byte_tokenizer

    text = "add 55+20= \tcafé 中文 ~"
    loaded = AutoTokenizer.from_pretrained(tiny_model)  # transformers 5 rebuilds it as Qwen2Tokenizer
    ids = loaded(text)["input_ids"]
    assert ids == byte_tokenizer()(text)["input_ids"]
    assert loaded.unk_token_id not in ids and len(ids) == 1 + len(text.encode())  # <bos>, then one per byte
    assert loaded.decode(ids, skip_special_tokens=True) == text


def test_the_launchers_reading_of_a_built_tokenizer_gives_the_ids_and_texts_autotokenizer_gives(tiny_model):
    from transformers import AutoTokenizer

    from rlflow.engines.tiny import ByteTokenizerFile

    fast, hf = ByteTokenizerFile.of(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    texts = [get_task(t).make(rng, 3, 5)["prompt"] for t in ("reverse", "sort", "add") for _ in range(20)]
    texts += ["", " leading space", "tab\tnew\nline", "naïve café", "e\u0301 (decomposed)", "日本語 🙂", "<bos><eos>",
              "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(200))]
    for special in (True, False):
        assert fast(texts, add_special_tokens=special)["input_ids"] == hf(texts, add_special_tokens=special)["input_ids"]
        assert [fast(t, add_special_tokens=special)["input_ids"] for t in texts] == \
            [hf(t, add_special_tokens=special)["input_ids"] for t in texts]
    ids = hf(texts)["input_ids"]
    for skip in (True, False):
        assert [fast.decode(i + [2, 0], skip_special_tokens=skip) for i in ids] == \
            [hf.decode(i + [2, 0], skip_special_tokens=skip) for i in ids]
    assert ByteTokenizerFile.of(str(REPO)) is None  # not a model built here: the launcher uses AutoTokenizer


def test_a_train_engine_without_the_sampling_argument_is_refused_naming_what_it_must_take(tiny_model):
    from rlflow.roles.actor import ActorConfig, make_engine

    with pytest.raises(TypeError, match=r"built as TrainerWithoutSampling\(model_path, cfg, sampling\).*"
                                        r"TrainerWithoutSampling\(model_path.*, cfg\) does not take"):
        make_engine(ActorConfig(engine="user_code.TrainerWithoutSampling"), tiny_model, SAMPLING)
