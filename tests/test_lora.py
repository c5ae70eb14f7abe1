"""LoRA (``actor.lora``, engines/lora.py): adapters on a frozen base, through peft, on the real tiny model.

What they pin: only the adapters train, and version 0 is the base model exactly; an adapter's gradient is
the chain rule of the whole model's; the rollout applies the
trainer's adapters (patched bit-exact through the weight channel) and generates with them, so on-policy
ratios stay 1; a restored checkpoint takes the same next step as the engine that saved it; export
merges adapters into a from_pretrained model with the same logprobs; whole runs, one trainer and
FSDP over two ranks, take the same steps, and a two-rank LoRA checkpoint resumes on one rank with the
same next steps; settings that cannot work are refused naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="actor.lora needs the lora extra (peft)")

from helpers import CHANNEL_SECRET, assert_all_processes_gone, eval_scores, metrics, rlflow, said  # noqa: E402
from rlflow.engines.base import SamplingParams  # noqa: E402
from rlflow.engines.config import LoraConfig  # noqa: E402
from rlflow.engines.hf import HFRolloutEngine, HFTrainEngine, sequence_logprobs  # noqa: E402
from rlflow.roles.config import ActorConfig, RolloutConfig  # noqa: E402
from rlflow.sync.weights import SyncConfig, WeightPublisher, WeightReceiver  # noqa: E402
from rlflow.transfer.channel import ChannelKey  # noqa: E402

LORA = LoraConfig(rank=4, alpha=8)
SAMPLING = SamplingParams(max_new_tokens=8, temperature=0.9)
ROLLOUT = RolloutConfig(device="cpu", dtype="float32", max_batch=64, seed=0)


def _prompts(tiny_model, n: int) -> list[list[int]]:
    import random

    from transformers import AutoTokenizer

    from rlflow.tasks.builtin import get_task

    tok, rng = AutoTokenizer.from_pretrained(tiny_model), random.Random(0)
    return [tok(get_task("reverse").make(rng, 3, 5)["prompt"])["input_ids"] for _ in range(n)]


def _trainer(tiny_model, lora=LORA, seed: int = 0, **cfg) -> HFTrainEngine:
    torch.manual_seed(seed)  # A is drawn from torch's generator
    return HFTrainEngine(tiny_model, ActorConfig(lr=1e-2, lora=lora, **cfg), SAMPLING)


def _train(engine: HFTrainEngine, prompts, steps: int) -> None:
    """``steps`` REINFORCE-like updates that raise the logprob of fixed responses (deterministic)."""
    responses = [[5 + (i % 7), 6, 2] for i in range(len(prompts))]
    for _ in range(steps):
        (-engine.token_logprobs(prompts, responses).sum()).backward()
        engine.step(1.0 / len(prompts))


def test_only_the_adapters_train_and_version_0_is_the_base_model(tiny_model):
    prompts = _prompts(tiny_model, 8)
    responses = [[5, 6, 2]] * 8
    plain, adapted = _trainer(tiny_model, LoraConfig()), _trainer(tiny_model)
    with torch.no_grad():  # B starts at zero: the wrapped model is the base, to the bit
        assert torch.equal(plain.token_logprobs(prompts, responses), adapted.token_logprobs(prompts, responses))
    names = set(adapted.weights())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trained = {id(p) for g in adapted.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in adapted.model.named_parameters() if n in names}  # the adapters alone
    base = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if n not in names}
    before = {n: p.detach().clone() for n, p in adapted.weights().items()}
    _train(adapted, prompts, 3)
    assert all(torch.equal(p, base[n]) for n, p in adapted.model.named_parameters() if n not in names)
    assert any(not torch.equal(p, before[n]) for n, p in adapted.weights().items() if ".lora_B." in n)


def test_an_adapters_gradient_is_the_chain_rule_of_the_whole_models(tiny_model):
    """y = W x + (alpha / r) B A x, so at any point dL/dB = (alpha / r) dL/dW Aᵀ (and at B = 0, dL/dA = 0)."""
    prompts = _prompts(tiny_model, 6)
    responses = [[5, 6, 7, 2]] * 6
    whole, adapted = _trainer(tiny_model, LoraConfig()), _trainer(tiny_model)
    for engine in (whole, adapted):
        (-engine.token_logprobs(prompts, responses).sum()).backward()
    ours, theirs = dict(adapted.model.named_parameters()), dict(whole.model.named_parameters())
    scale = LORA.alpha / LORA.rank
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a = ours[f"base_model.model.{layer}.lora_A.default.weight"]
        b = ours[f"base_model.model.{layer}.lora_B.default.weight"]
        assert torch.allclose(b.grad, scale * theirs[f"{layer}.weight"].grad @ a.detach().T, atol=1e-6)
        assert float(b.grad.abs().max()) > 1e-3 and float(a.grad.abs().max()) == 0.0


def test_activation_checkpointing_gives_adapters_the_same_gradient(tiny_model):
    """Checkpointing recomputes layers in backward; with a frozen base the adapters' gradients must still flow."""
    prompts = _prompts(tiny_model, 8)
    grads = []
    for checkpointing in (False, True):
        engine = _trainer(tiny_model, activation_checkpointing=checkpointing)
        (-engine.token_logprobs(prompts, [[5, 6, 2]] * 8).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == set(engine.weights())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert any(float(g.abs().max()) > 0 for g in grads[1].values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_rollout_applies_the_trainers_adapters_bit_exact_and_generates_with_them(tiny_model, short_dir, dtype):
    prompts = _prompts(tiny_model, 16)
    trainer = _trainer(tiny_model)
    pub = WeightPublisher(f"ipc://{short_dir}/w", SyncConfig(), getattr(torch, dtype), key=ChannelKey(CHANNEL_SECRET))
    rx = WeightReceiver(pub.address, SyncConfig(), key=ChannelKey(CHANNEL_SECRET))
    rollout = HFRolloutEngine(tiny_model, dataclasses.replace(ROLLOUT, dtype=dtype), LORA)
    base = HFRolloutEngine(tiny_model, dataclasses.replace(ROLLOUT, dtype=dtype))
    full = sum(p.numel() * p.element_size() for p in base.tensors().values())
    try:
        for version in range(3):  # the keyframe of version 0 (random A, zero B), then two patches
            stats = pub.publish(version, trainer.weights())
            assert stats["sync/bytes"] < full / 10  # adapters only: the base never travels
            assert [r["bit_exact"] for r in rx.update(rollout, need=version, timeout=10)] == [1]
            assert rollout.version == version
            _train(trainer, prompts, 2)
        pub.publish(3, trainer.weights())
        rx.update(rollout, need=3, timeout=10)
        gens = rollout.generate(prompts, SAMPLING)
        with torch.no_grad():
            ours = trainer.token_logprobs(prompts, [g.response_ids for g in gens])
            theirs = sequence_logprobs(base.model, prompts, [g.response_ids for g in gens], 0.9, "cpu")
        tol = 1e-4 if dtype == "float32" else 0.1
        moved = 0.0
        for i, g in enumerate(gens):  # the rollout samples from the trainer's policy, not from the base
            assert torch.allclose(ours[i, : len(g.logprobs)], torch.tensor(g.logprobs), atol=tol)
            moved = max(moved, float((ours[i, : len(g.logprobs)] - theirs[i, : len(g.logprobs)]).abs().max()))
        assert moved > 10 * tol
    finally:
        rx.close()
        pub.close()


def test_a_restored_lora_checkpoint_takes_the_same_next_step_as_the_engine_that_saved_it(tiny_model, tmp_path):
    prompts = _prompts(tiny_model, 8)
    first = _trainer(tiny_model)
    _train(first, prompts, 2)
    first.snapshot()(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.glob("*.safetensors"))  # the base is not copied into every checkpoint
    again = _trainer(tiny_model, seed=1)  # another draw of A: the checkpoint's must replace it
    assert not torch.equal(*(next(t for n, t in e.weights().items() if ".lora_A." in n) for e in (first, again)))
    again.restore(str(tmp_path), 2)
    assert again.version == 2
    _train(first, prompts, 1)
    _train(again, prompts, 1)
    for (name, a), b in zip(first.weights().items(), again.weights().values()):
        assert torch.equal(a, b), name


def test_export_merges_the_adapters_into_a_from_pretrained_model_with_the_same_logprobs(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlflow.train.checkpoint import export

    prompts = _prompts(tiny_model, 8)
    trainer = _trainer(tiny_model)
    _train(trainer, prompts, 3)
    trainer.snapshot()(str(tmp_path / "ckpt"))
    export(tmp_path / "ckpt", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    responses = [[5, 6, 7, 2]] * len(prompts)
    with torch.no_grad():
        a = sequence_logprobs(merged, prompts, responses, SAMPLING.temperature, "cpu")
        b = trainer.token_logprobs(prompts, responses)
    assert torch.allclose(a, b, atol=1e-5)
    # the base moved: export takes it from --base, and says so when it is missing
    moved = tmp_path / "base"
    shutil.copytree(tiny_model, moved)
    config = tmp_path / "ckpt" / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match="--base"):
        export(tmp_path / "ckpt", tmp_path / "again")
    export(tmp_path / "ckpt", tmp_path / "again", base=moved, dtype="bfloat16")  # merged in float32, then rounded
    rounded = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert {p.dtype for p in rounded.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(merged.named_parameters(), rounded.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_lora_settings_that_cannot_work_are_refused_naming_the_field(tiny_model, tmp_path):
    from rlflow.errors import ConfigError
    from rlflow.flow.config import RunConfig, checkpoint_problem
    from rlflow.roles.rollout import make_engine

    with pytest.raises(ValueError, match=r"actor.lora.target_modules.*linear layers are named \[.*q_proj"):
        _trainer(tiny_model, LoraConfig(rank=4, target_modules=["qkv"]))
    # the tiny model ties lm_head to the input embeddings: a merge would change both
    with pytest.raises(ValueError, match=r"actor.lora.target_modules.*lm_head shares its weight with the input"):
        _trainer(tiny_model, LoraConfig(rank=4, target_modules=["q_proj", "lm_head"]))
    for bad, field in ((LoraConfig(rank=-1), "actor.lora.rank"), (LoraConfig(rank=4, alpha=0), "actor.lora.alpha"),
                       (LoraConfig(rank=4, target_modules=[]), "actor.lora.target_modules"),
                       (LoraConfig(rank=4, final="both"), "actor.lora.final")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            bad.check()
    cfg = RunConfig()
    cfg.actor.lora = LoraConfig(rank=8)
    cfg.rollout.engine, cfg.rollout.device, cfg.actor.device = "sglang", "cuda", "cuda"
    cfg.rollout.sglang.update = "distributed"
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.update.*update=disk"):
        cfg.check()
    with pytest.raises(TypeError, match=r"actor.lora.rank=4.*takes no lora"):
        make_engine(RolloutConfig(engine="user_code.PlainEngine"), tiny_model, LORA)
    # a LoRA checkpoint is no start model: the message names the command that makes one
    trainer = _trainer(tiny_model)
    trainer.snapshot()(str(tmp_path / "ckpt"))
    assert "rlflow export" in checkpoint_problem(str(tmp_path / "ckpt"))


# ---------------------------------------------------------------------------- whole runs
# the default lr (3e-4): Adam, which divides by the gradient's size, amplifies the float summation
# differences of 2 ranks' reduction with the rate (adapters 1.3e-4 apart after 5 steps at 1e-2)
ON_POLICY = ["flow.staleness=0", "flow.steps=5", "actor.lora.rank=8"]


@pytest.fixture(scope="module")
def one_trainer(tmp_path_factory, tiny_model, model_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("lora1") / "run"
    r = rlflow(run_dir, model_cache, *ON_POLICY, "actor.lora.final=merged")
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model, model_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("lora2") / "run"
    r = rlflow(run_dir, model_cache, *ON_POLICY, "actor.replicas=2", "actor.parallel=fsdp", "actor.checkpoint_every=2",
               "actor.checkpoint_keep=1")
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


def adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors")


def test_a_lora_run_syncs_only_adapters_and_its_rollout_samples_the_trained_policy(one_trainer, tiny_model):
    from transformers import AutoModelForCausalLM

    rows = metrics(one_trainer)
    assert len(rows) == 5 and all(m["sync/bit_exact"] == 1 for m in rows)
    full = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert max(m["sync/bytes"] for m in rows) < full / 10
    # on-policy: the rollout generated with the adapters the trainer had, step after step
    assert all(abs(m["is/token_max"] - 1) < 1e-4 for m in rows)
    final = one_trainer / "checkpoints" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")  # actor.lora.final=merged: from_pretrained
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(merged.parameters(), base.parameters()))
    assert moved > 1e-4  # the adapters learned something (1.2e-3 at lr 3e-4), and it is in the merged weights
    assert_all_processes_gone(one_trainer)


def test_fsdp_lora_over_two_ranks_takes_the_steps_one_lora_trainer_takes(one_trainer, two_ranks):
    ours, theirs = metrics(two_ranks), metrics(one_trainer)
    assert [m["reward/mean"] for m in ours] == [m["reward/mean"] for m in theirs]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-5, abs=1e-7)
    a, b = adapters(two_ranks), adapters(one_trainer)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-5), (name, float((a[name] - b[name]).abs().max()))
    summary = json.loads((two_ranks / "summary.json").read_text())
    assert summary["trainer"] == {"replicas": 2, "identical_weights": True}
    assert not (two_ranks / "checkpoints" / "final" / "dcp").exists()  # adapters are gathered, not DCP rows
    assert_all_processes_gone(two_ranks)


def test_a_two_rank_lora_checkpoint_resumes_on_one_rank_with_the_same_next_steps(tmp_path, two_ranks, model_cache):
    runs = {}
    for name, trainer in (("two", ["actor.replicas=2", "actor.parallel=fsdp"]), ("one", ["actor.replicas=1"])):
        runs[name] = tmp_path / name
        shutil.copytree(two_ranks, runs[name])
        r = rlflow(runs[name], model_cache, "resume=true", "flow.steps=7", "flow.staleness=0", *trainer)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "resum" in said(r).lower()
    ours, theirs = [m for m in metrics(runs["one"]) if m["step"] >= 6], [m for m in metrics(runs["two"]) if m["step"] >= 6]
    assert [m["step"] for m in ours] == [6, 7] == [m["step"] for m in theirs]
    assert [m["reward/mean"] for m in ours] == [m["reward/mean"] for m in theirs]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-5, abs=1e-7)
    a, b = adapters(runs["one"]), adapters(runs["two"])
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=1e-5) for n in a)
    for run_dir in runs.values():  # the adapters' AdamW state went on from the checkpoint's 5 steps: 7, not 2
        state = torch.load(run_dir / "checkpoints" / "final" / "optimizer.pt", weights_only=True)["state"]
        assert len(state) == len(a)  # every adapter tensor, and nothing of the base
        assert {float(s["step"]) for s in state.values()} == {7.0}


def test_rlflow_eval_scores_a_lora_checkpoint_as_its_merged_model(one_trainer):
    """The adapters on their base, unmerged as the trainer held them, score what the merged model scores."""
    final = one_trainer / "checkpoints" / "final"
    adapters, merged = (eval_scores(ckpt, "--prompts", "8", "--samples", "2") for ckpt in (final, final / "merged"))
    assert adapters == pytest.approx(merged, abs=1e-9) and "pass@2" in adapters
