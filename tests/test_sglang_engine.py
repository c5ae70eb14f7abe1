"""The sglang rollout engine without sglang: request building, response parsing, update sequencing.

sglang needs a GPU, so these tests talk to ``tests/sglang_standin.py``: a real HTTP server on a real
socket speaking sglang 0.5.x's request and response shapes, with the tiny model behind it. What they
cannot show (sglang's own kernels, logprob numerics, CUDA IPC) is marked in the live test at the end,
which runs only where sglang and a GPU are present.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import pytest
import torch

from rlflow.engines.base import SamplingParams
from rlflow.roles.rollout import RolloutConfig
from rlflow.engines.sglang_api import SGLangError, generate_request, parse_generation, parse_version, rids_for
from rlflow.engines.sglang import SGLangConfig, SGLangEngine, tensor_buckets
from sglang_standin import StandIn


@pytest.fixture
def standin(tiny_model):
    s = StandIn(tiny_model)
    yield s
    s.close()


def engine_for(standin: StandIn, tiny_model: str, **sglang) -> SGLangEngine:
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(**{"url": standin.url, "startup_timeout": 10, **sglang}))
    return SGLangEngine(tiny_model, cfg)


def model_weights(path: str) -> dict[str, torch.Tensor]:
    from rlflow.engines.hf import load_model

    return {k: v.detach().clone() for k, v in load_model(path, "float32", "cpu").named_parameters()}


# ---------------------------------------------------------------------------- requests and responses
def test_a_generate_request_states_every_sampling_parameter_and_one_distinct_rid_per_prompt():
    req = generate_request([[1, 2], [3]], SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=0),
                           [5, 6], rids_for("rlfx", 3, 2))
    sp = req["sampling_params"]
    assert (sp["max_new_tokens"], sp["temperature"], sp["top_p"], sp["top_k"]) == (7, 0.7, 0.9, -1)  # 0 is invalid in sglang
    assert sp["stop_token_ids"] == [5, 6] and sp["n"] == 1 and sp["ignore_eos"] is False
    assert req["input_ids"] == [[1, 2], [3]] and req["return_logprob"] is True and req["logprob_start_len"] == -1
    assert len(set(req["rid"])) == 2
    with pytest.raises(ValueError):
        generate_request([[1], [2]], SamplingParams(4), [5], ["a", "a"])


def test_rids_are_fixed_width_so_none_is_a_prefix_of_another():
    rids = rids_for("rlfab", 1, 12) + rids_for("rlfab", 10, 12)
    assert len({len(r) for r in rids}) == 1
    assert not any(a != b and b.startswith(a) for a in rids for b in rids)


def test_a_documented_response_parses_into_tokens_logprobs_and_reason():
    item = {"text": "21", "output_ids": [7, 9, 2], "meta_info": {
        "id": "x", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 4, "completion_tokens": 3,
        "cached_tokens": 0, "weight_version": "3",
        "output_token_logprobs": [[-0.5, 7, None], [-1.25, 9, None], [-0.01, 2, None]]}}
    g = parse_generation(item, "3")
    assert (g.response_ids, g.logprobs, g.finish_reason) == ([7, 9, 2], [-0.5, -1.25, -0.01], "stop")
    item["meta_info"]["finish_reason"] = {"type": "length", "length": 3}
    assert parse_generation(item, "3").finish_reason == "length"


def test_an_aborted_sequence_parses_as_none_so_it_is_sent_again():
    item = {"text": "", "output_ids": [], "meta_info": {"id": "x", "finish_reason": {
        "type": "abort", "message": "Abort in waiting queue"}, "completion_tokens": 0, "output_token_logprobs": []}}
    assert parse_generation(item, "3") is None


@pytest.mark.parametrize("change,message", [
    (lambda m, i: m.update(weight_version="2"), "weight version '2'"),
    (lambda m, i: m["output_token_logprobs"].pop(), "2 logprobs for 3 output tokens"),
    (lambda m, i: m["output_token_logprobs"].__setitem__(1, [-1.0, 8, None]), "is for token 8"),
    (lambda m, i: m.pop("output_token_logprobs"), "was return_logprob sent"),
    (lambda m, i: m.update(finish_reason={"type": "timeout"}), "unknown reason"),
])
def test_a_response_the_trainer_could_misread_is_refused(change, message):
    item = {"output_ids": [7, 9, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "weight_version": "3",
                                                  "output_token_logprobs": [[-0.5, 7, None], [-1.2, 9, None], [-0.1, 2, None]]}}
    change(item["meta_info"], item)
    with pytest.raises(SGLangError, match=message):
        parse_generation(item, "3")


def test_versions_and_buckets():
    assert parse_version("0.5.10.post1") == (0, 5, 10) and parse_version("0.5.6") >= (0, 5, 6)
    assert parse_version("0.4.9rc1") == (0, 4, 9)
    w = {f"t{i}": torch.zeros(n) for i, n in enumerate([10, 10, 30, 5, 5])}  # float32: 40, 40, 120, 20, 20 bytes
    assert [[n for n, _ in b] for b in tensor_buckets(w, 100)] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


# ---------------------------------------------------------------------------- against the stand-in server
def test_generation_returns_the_servers_tokens_and_logprobs_at_the_installed_version(standin, tiny_model):
    engine = engine_for(standin, tiny_model)
    weights = model_weights(tiny_model)
    engine.load_weights(weights, 1)
    gens = engine.generate([[3, 4, 5]] * 4, SamplingParams(max_new_tokens=6))
    assert len(gens) == 4 and all(1 <= len(g.response_ids) == len(g.logprobs) <= 6 for g in gens)
    assert all(lp <= 0 for g in gens for lp in g.logprobs) and standin.generated_versions == ["1"]
    body = next(b for p, b in standin.calls if p == "/generate")
    assert body["sampling_params"]["stop_token_ids"] == engine.stop_ids


def test_a_weight_update_pauses_in_abort_mode_updates_tags_flushes_then_resumes(standin, tiny_model):
    engine = engine_for(standin, tiny_model)
    weights = model_weights(tiny_model)
    weights = {k: v + 0.01 for k, v in weights.items()}
    standin.calls.clear()
    engine.load_weights(weights, 7)
    assert standin.paths() == ["/pause_generation", "/update_weights_from_disk", "/update_weight_version",
                               "/flush_cache", "/continue_generation", "/get_model_info"]
    bodies = dict(standin.calls)
    assert bodies["/pause_generation"] == {"mode": "abort"}
    assert bodies["/update_weights_from_disk"]["weight_version"] == "7" and bodies["/update_weights_from_disk"]["flush_cache"]
    assert bodies["/update_weight_version"] == {"new_version": "7", "abort_all_requests": False}
    served = dict(standin.engine.model.named_parameters())
    assert all(torch.equal(served[k], v) for k, v in weights.items())  # bit-exact through the safetensors snapshot
    assert engine.version == 7 and standin.weight_version == "7"


def test_only_the_newest_snapshot_is_kept_and_none_after_close(standin, tiny_model):
    engine = engine_for(standin, tiny_model)
    weights = model_weights(tiny_model)
    engine.load_weights(weights, 1)
    engine.load_weights(weights, 2)
    assert sorted(p.name for p in engine.update_root.iterdir()) == ["v2"]
    engine.close()
    assert not engine.update_root.exists()


def test_a_busy_flush_is_retried_and_a_flush_that_never_succeeds_fails_naming_its_bound(standin, tiny_model):
    engine = engine_for(standin, tiny_model, flush_timeout=5)
    weights = model_weights(tiny_model)
    standin.flush_busy = 2
    engine.load_weights(weights, 1)
    assert standin.paths().count("/flush_cache") == 3 and engine.version == 1
    standin.flush_busy = 10 ** 6
    engine.cfg = dataclasses.replace(engine.cfg, flush_timeout=1.2)
    standin.calls.clear()
    with pytest.raises(SGLangError, match="flush_timeout"):
        engine.load_weights(weights, 2)
    assert "/continue_generation" not in standin.paths()  # never resumed on weights it could not settle
    assert engine.version == 1


def test_a_failed_update_raises_with_the_servers_message_and_does_not_resume(standin, tiny_model):
    engine = engine_for(standin, tiny_model)
    standin.fail_update = True
    standin.calls.clear()
    with pytest.raises(SGLangError, match="update_weights_from_disk failed.*no checkpoint"):
        engine.load_weights(model_weights(tiny_model), 1)
    assert standin.paths() == ["/pause_generation", "/update_weights_from_disk"]


def test_aborted_sequences_are_sent_again_and_give_up_after_max_retries(standin, tiny_model):
    engine = engine_for(standin, tiny_model, max_retries=1)
    engine.load_weights(model_weights(tiny_model), 1)
    standin.abort_next = 3
    gens = engine.generate([[3, 4, 5]] * 5, SamplingParams(max_new_tokens=4))
    assert all(g is not None and g.response_ids for g in gens)
    sent = [len(b["input_ids"]) for p, b in standin.calls if p == "/generate"]
    assert sent == [5, 3]  # the aborted three, again


def test_a_server_updated_behind_the_engines_back_is_refused(standin, tiny_model):
    engine = engine_for(standin, tiny_model)
    engine.load_weights(model_weights(tiny_model), 4)
    standin.weight_version = "5"  # another client installed weights
    with pytest.raises(SGLangError, match="weight version '5' but this engine installed '4'"):
        engine.generate([[3, 4]], SamplingParams(max_new_tokens=3))


def test_no_server_at_the_url_fails_within_its_bound_naming_the_field(tiny_model):
    cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(url="http://127.0.0.1:9", startup_timeout=1))
    with pytest.raises(SGLangError, match="startup_timeout=1s"):
        SGLangEngine(tiny_model, cfg)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may launch a real server")
def test_a_server_with_an_api_key_serves_only_callers_that_present_it(standin, tiny_model):
    standin.api_key = "s3cret-" * 5
    with pytest.raises(SGLangError, match="401"):
        engine_for(standin, tiny_model, startup_timeout=1)
    engine = engine_for(standin, tiny_model, api_key=standin.api_key)
    try:
        assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3))) == 1
        assert standin.api_key not in repr(engine.cfg)
    finally:
        engine.close()


def test_a_launched_servers_key_is_handed_over_in_a_private_file_not_on_its_command_line(tmp_path, capsys):
    from rlflow.engines.sglang import server_key_args

    key_dir = tmp_path / "private"
    key_dir.mkdir(mode=0o700)
    args = server_key_args("the-run-key", str(key_dir))
    assert args == ["--config", str(key_dir / "server.yaml")] and "the-run-key" not in " ".join(args)
    assert (key_dir / "server.yaml").stat().st_mode & 0o777 == 0o600
    import yaml

    assert yaml.safe_load((key_dir / "server.yaml").read_text()) == {"api-key": "the-run-key"}
    assert server_key_args("the-run-key", None) == ["--api-key", "the-run-key"]  # an sglang without --config
    assert "other local users can read it" in capsys.readouterr().err


def test_launched_servers_always_take_a_key_shipped_only_when_the_trainer_needs_it():
    """update=distributed: one random key per run in the plans (the trainer pushes weights into the
    servers), never in the saved config; otherwise each replica makes its own and nothing is shipped."""
    from rlflow.engines.sglang import server_key
    from rlflow.flow.config import RunConfig
    from rlflow.flow.launcher import plan_roles

    def keys(cfg):
        plans = plan_roles(cfg)
        rollouts = {p.config.sglang.api_key for p in plans if p.role == "rollout"}
        [actor] = [p for p in plans if p.role == "actor"]
        return rollouts, actor.args.broadcast.sglang.api_key

    cfg = RunConfig()
    cfg.rollout.engine, cfg.rollout.replicas, cfg.rollout.sglang.update = "sglang", 2, "distributed"
    (first,), broadcast = keys(cfg)
    assert len(first) >= 32 and broadcast == first and cfg.rollout.sglang.api_key is None
    assert keys(cfg)[0] != {first}  # another run, another key
    cfg.rollout.sglang.api_key = "the-users-key"
    assert keys(cfg) == ({"the-users-key"}, "the-users-key")
    cfg.rollout.sglang.api_key, cfg.rollout.sglang.url = None, "http://127.0.0.1:1"  # a server of the user's
    assert keys(cfg) == ({None}, None) and server_key(cfg.rollout.sglang) is None
    cfg.rollout.sglang.url, cfg.rollout.sglang.update = None, "disk"
    assert {p.config.sglang.api_key for p in plan_roles(cfg) if p.role == "rollout"} == {None}  # nothing shipped
    mine, other = server_key(cfg.rollout.sglang), server_key(cfg.rollout.sglang)
    assert len(mine) >= 32 and mine != other  # each replica's launched server: a key of its own


def test_launching_without_sglang_installed_names_the_extra_and_the_url_alternative(tiny_model):
    pytest.importorskip("torch")
    try:
        import sglang  # noqa: F401
        pytest.skip("sglang is installed here")
    except ImportError:
        pass
    with pytest.raises(SGLangError, match=r"rlflow\[sglang\].*rollout.sglang.url"):
        SGLangEngine(tiny_model, RolloutConfig(engine="sglang", device="cuda"))


def test_with_lora_each_version_is_an_adapter_loaded_by_name_and_every_generate_runs_with_it(tiny_model):
    """The base never changes: a version's adapters are peft files the server loads under a name of their
    own; the older adapter is unloaded, the cache flushed, and every /generate names the newest one."""
    pytest.importorskip("peft", reason="actor.lora needs the lora extra (peft)")
    from rlflow.engines.config import LoraConfig
    from rlflow.engines.hf import HFTrainEngine
    from rlflow.engines.sglang import lora_launch_args
    from rlflow.roles.config import ActorConfig

    lora = LoraConfig(rank=4, alpha=8)
    assert lora_launch_args(lora)[:3] == ["--enable-lora", "--max-lora-rank", "4"]
    standin = StandIn(tiny_model, lora=lora)
    try:
        engine = SGLangEngine(tiny_model, RolloutConfig(engine="sglang", sglang=SGLangConfig(url=standin.url)), lora)
        torch.manual_seed(0)
        trainer = HFTrainEngine(tiny_model, ActorConfig(lr=1e-2, lora=lora), SamplingParams(max_new_tokens=6))
        prompts = [[3, 4, 5], [3, 6], [4, 4, 5, 6]] * 2
        for version in (1, 2):
            (-trainer.token_logprobs(prompts, [[5, 6, 2]] * len(prompts)).sum()).backward()
            trainer.step(1.0)
            standin.calls.clear()
            engine.load_weights(trainer.weights(), version)
            expected = ["/load_lora_adapter", "/update_weight_version"] + ["/unload_lora_adapter"] * (version > 1)
            assert standin.paths() == expected + ["/flush_cache", "/get_model_info"]
        assert list(standin.adapters) == [engine.adapter] and engine.adapter.endswith("-v2")
        assert sorted(p.name for p in engine.update_root.iterdir()) == ["lora-v2"]
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=6))
        assert dict(standin.calls)["/generate"]["lora_path"] == engine.adapter
        with torch.no_grad():  # what the server sampled with is the trainer's policy, adapters and all
            logp = trainer.token_logprobs(prompts, [g.response_ids for g in gens])
        for i, g in enumerate(gens):
            assert torch.allclose(logp[i, : len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-4)
        # a load the server refuses: the error names the endpoint, and nothing generates until a version is in
        standin.fail_lora_load = True
        with pytest.raises(SGLangError, match="/load_lora_adapter failed"):
            engine.load_weights(trainer.weights(), 3)
        assert engine.version == 2 and engine.adapter is None
        with pytest.raises(SGLangError, match="no LoRA adapter is loaded"):
            engine.generate(prompts, SamplingParams(max_new_tokens=6))
        engine.load_weights(trainer.weights(), 3)  # the next version goes in; the older adapter goes out
        assert list(standin.adapters) == [engine.adapter] and engine.adapter.endswith("-v3")
        engine.load_weights(trainer.weights(), 3)  # the same version again (a resync): sglang refuses a held name
        assert list(standin.adapters) == [engine.adapter]
        engine.close()  # a server at rollout.sglang.url outlives the engine: it keeps none of its adapters
        assert standin.adapters == {}
    finally:
        standin.close()


def test_a_server_at_the_url_launched_without_the_runs_lora_flags_is_refused_naming_them(tiny_model):
    pytest.importorskip("peft", reason="actor.lora needs the lora extra (peft)")
    from rlflow.engines.config import LoraConfig

    for served, message in ((None, "launched without LoRA: launch it with --enable-lora --max-lora-rank 8"),
                            (LoraConfig(rank=4), "rank <= 4"),
                            (LoraConfig(rank=8, target_modules=["q_proj"]), "applies adapters to \\['q_proj'\\] only")):
        standin = StandIn(tiny_model, lora=served)
        try:
            cfg = RolloutConfig(engine="sglang", sglang=SGLangConfig(url=standin.url, startup_timeout=10))
            with pytest.raises(SGLangError, match=message):
                SGLangEngine(tiny_model, cfg, LoraConfig(rank=8))
        finally:
            standin.close()


# ---------------------------------------------------------------------------- a whole run
def test_a_run_with_the_sglang_engine_trains_and_the_server_holds_the_trainers_weights_bit_exact(
        tmp_path, tiny_model, model_cache, standin):
    from safetensors.torch import load_file

    from test_runs import metrics, rlflow

    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "rollout.engine=sglang", f"rollout.sglang.url={standin.url}", "flow.steps=4",
               "flow.staleness=0", "actor.checkpoint_every=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(metrics(run_dir)) == 4
    # Staleness 0: the steps' samples came from versions 0, 1, 2, 3, each installed through the update sequence.
    assert standin.generated_versions == ["0", "1", "2", "3"]
    served = {k: v for k, v in standin.engine.model.named_parameters()}
    trained = load_file(str(run_dir / "checkpoints/step-3/model.safetensors"))
    assert all(torch.equal(served[k], trained[k]) for k in served)


def test_a_lora_run_with_the_sglang_engine_generates_every_step_with_the_trainers_adapters(tmp_path, tiny_model, model_cache):
    pytest.importorskip("peft", reason="actor.lora needs the lora extra (peft)")
    from safetensors.torch import load_file

    from rlflow.engines import lora
    from rlflow.engines.config import LoraConfig
    from test_runs import metrics, rlflow

    standin = StandIn(tiny_model, lora=LoraConfig(rank=8))  # as launched with --max-lora-rank 8
    try:
        run_dir = tmp_path / "run"
        r = rlflow(run_dir, model_cache, "rollout.engine=sglang", f"rollout.sglang.url={standin.url}", "flow.steps=3",
                   "flow.staleness=0", "actor.lora.rank=8", "actor.lr=2e-3", "actor.checkpoint_every=1",
                   "actor.checkpoint_keep=3")
        assert r.returncode == 0, r.stdout + r.stderr
        rows = metrics(run_dir)
        assert standin.generated_versions == ["0", "1", "2"] and all(abs(m["is/token_max"] - 1) < 1e-4 for m in rows)
        # the last step's samples came from version 2's adapters, bit-exact; the server holds none of ours now
        served = standin.generated_with
        trained = load_file(str(run_dir / "checkpoints/step-2/adapter/adapter_model.safetensors"))
        assert {lora.model_name(k) for k in trained} == set(served)
        assert all(torch.equal(served[lora.model_name(k)], v) for k, v in trained.items())
        assert standin.adapters == {}
    finally:
        standin.close()


def test_multi_turn_episodes_run_through_the_sglang_engine_on_exact_input_ids(tmp_path, model_cache, standin):
    """Each turn of an episode is a /generate request on input ids: the context of a later turn is an
    earlier request's ids, the tokens sampled for it and the observation's, in that order."""
    from test_runs import metrics, rlflow

    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "rollout.engine=sglang", f"rollout.sglang.url={standin.url}", "flow.steps=2",
               "env.cls=user_envs.FlakyEnv", "+env.kwargs.behaviour=ok", "env.max_turns=3", "rollout.max_new_tokens=4",
               "reward.fn=rlflow.tasks.rewards.env_reward")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [m["episode/turns_mean"] for m in metrics(run_dir)] == [3, 3]
    inputs = [tuple(i) for i in standin.inputs]
    firsts = {i for i in inputs if not any(len(j) < len(i) and i[: len(j)] == j for j in inputs)}
    later = [i for i in inputs if i not in firsts]
    assert later and all(any(i[: len(f)] == f for f in firsts) for i in later)  # every later turn extends a first


@pytest.mark.skipif(os.environ.get("RLFLOW_SGLANG_MODEL") is None,
                    reason="live sglang test: needs sglang, a GPU and RLFLOW_SGLANG_MODEL=<checkpoint dir>")
def test_live_sglang_server_generates_and_takes_a_weight_update():  # pragma: no cover - GPU hosts only
    model = os.environ["RLFLOW_SGLANG_MODEL"]
    engine = SGLangEngine(model, RolloutConfig(engine="sglang", device="cuda", dtype="bfloat16"))
    try:
        weights = {k: v.to(torch.bfloat16) for k, v in model_weights(model).items()}
        engine.load_weights(weights, 1)
        gens = engine.generate([[1, 2, 3, 4]] * 8, SamplingParams(max_new_tokens=16))
        assert all(len(g.response_ids) == len(g.logprobs) for g in gens)
        print(json.dumps({"lengths": [len(g.response_ids) for g in gens]}))
    finally:
        engine.close()


def test_a_run_where_the_trainer_broadcasts_to_the_server_trains_at_the_trainers_versions(
        tmp_path, tiny_model, model_cache, standin):
    """update=distributed: the trainer joins the server in one (gloo) process group and installs each version
    itself; the rollout reads every sample's version from the server's answers."""
    from safetensors.torch import load_file

    from test_runs import metrics, rlflow

    run_dir = tmp_path / "run"
    standin.api_key = "k" * 32  # the rollout's client and the trainer's broadcaster both present it
    r = rlflow(run_dir, model_cache, "rollout.engine=sglang", f"rollout.sglang.url={standin.url}",
               f"rollout.sglang.api_key={standin.api_key}", "rollout.sglang.update=distributed", "flow.steps=4",
               "flow.staleness=0", "actor.checkpoint_every=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert standin.unauthorized == 0
    rows = metrics(run_dir)
    assert len(rows) == 4 and all(m["staleness/max"] == 0 and m["sync/broadcast_s"] > 0 for m in rows)
    assert standin.generated_versions == ["0", "1", "2", "3"]
    assert "/update_weights_from_disk" not in standin.paths()
    assert standin.paths().count("/update_weights_from_distributed") == 5  # version 0, then after each step
    served = {k: v for k, v in standin.engine.model.named_parameters()}
    trained = load_file(str(run_dir / "checkpoints/final/model.safetensors"))  # step 4, the last
    assert all(torch.equal(served[k], trained[k]) for k in served)


# ---------------------------------------------------------------------------- in-flight updates (abort and resume)
def test_in_flight_an_update_cuts_requests_that_resume_on_the_new_weights_with_each_tokens_version_and_logprob(
        tiny_model):
    """rollout.update=in_flight on sglang: an update's abort-mode pause returns every request in flight with what
    it had; each is sent again as prompt + those tokens and finishes on the new weights. Every token carries
    the version it ran at, and its logprob is that version's policy (recomputed here)."""
    from rlflow.engines.hf import load_model, load_parameters, sequence_logprobs

    standin = StandIn(tiny_model, token_s=0.01)  # 10 ms a token: updates land while requests decode
    try:
        cfg = RolloutConfig(engine="sglang", update="in_flight", max_batch=8,
                            sglang=SGLangConfig(url=standin.url, startup_timeout=10))
        engine = SGLangEngine(tiny_model, cfg)
        engine.load_weights(model_weights(tiny_model), 0)
        torch.manual_seed(0)
        versions = {0: model_weights(tiny_model)}
        versions[1] = {k: v + torch.randn_like(v) * 0.05 for k, v in versions[0].items()}
        t0, calls = time.monotonic(), []

        def between(running: int):
            calls.append(running)
            if engine.version == 0 and time.monotonic() - t0 > 0.05:
                engine.load_weights(versions[1], 1)

        prompts = [[5 + i % 7, 6, 7, 8] for i in range(12)]
        handed: dict[int, object] = {}
        engine.generate(prompts, SamplingParams(max_new_tokens=16), between=between,
                        finished=lambda i, g: handed.__setitem__(i, g))
        assert sorted(handed) == list(range(12)) and engine.version == 1
        spans = [g for g in handed.values() if g.token_versions[0] == 0 and g.token_versions[-1] == 1]
        assert spans, "no request was cut by the update"
        assert all(g.token_versions == sorted(g.token_versions) and set(g.token_versions) <= {0, 1}
                   for g in handed.values())
        requests = [b for p, b in standin.calls if p == "/generate"]
        assert len(requests) > 12  # the cut requests were sent again, each as its prompt and what it had
        assert all(len(b["input_ids"]) == 1 for b in requests)  # a request per sequence
        for v, weights in versions.items():
            model = load_model(tiny_model, "float32", "cpu")
            load_parameters(model, weights)
            with torch.no_grad():
                again = sequence_logprobs(model, [prompts[i] for i in range(12)],
                                          [handed[i].response_ids for i in range(12)], 1.0, "cpu")
            pairs = torch.tensor([(g.logprobs[t], float(again[i, t])) for i, g in handed.items()
                                  for t, tv in enumerate(g.token_versions) if tv == v])
            assert len(pairs) and torch.allclose(pairs[:, 0], pairs[:, 1], atol=1e-4), v
    finally:
        standin.close()


def test_a_run_with_in_flight_updates_on_sglang_keeps_every_token_within_the_staleness_bound(tmp_path, tiny_model,
                                                                                          model_cache):
    from test_runs import metrics, rlflow

    standin = StandIn(tiny_model, token_s=0.005)
    try:
        run_dir = tmp_path / "run"
        r = rlflow(run_dir, model_cache, "rollout.engine=sglang", f"rollout.sglang.url={standin.url}",
                   "rollout.update=in_flight", "rollout.max_new_tokens=16", "flow.steps=6", "flow.staleness=1")
        assert r.returncode == 0, r.stdout + r.stderr
        rows = metrics(run_dir)
        assert len(rows) == 6 and all(m["staleness/max"] <= 1 for m in rows)
        assert all(1 <= m["rollout/versions_spanned_mean"] <= 2 for m in rows)
        ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
        assert ledger["issued"] == ledger["trained"] and ledger["issued_not_consumed"] == 0
    finally:
        standin.close()
