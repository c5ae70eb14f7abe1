"""Recipes: compose-time failures for typos and wrong types, validation naming the field, the GPU recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rlflow.flow.config import ConfigError, register

REPO = Path(__file__).resolve().parents[1]


def _compose(name: str = "default", overrides: list[str] = ()):
    register()
    with initialize_config_module(config_module="rlflow.recipes", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_the_default_recipe_composes_and_validates():
    cfg = OmegaConf.to_object(_compose(overrides=["run_dir=/tmp/x"]))
    cfg.check()
    assert cfg.model.path is None


def test_a_misspelled_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="stalenes"):
        _compose(overrides=["flow.stalenes=2"])


def test_a_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="flow.steps"):
        _compose(overrides=["flow.steps=many"])


@pytest.mark.parametrize("override,field", [
    ("flow.staleness=-1", "flow.staleness"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("data.task=poetry", "data.task"),
    ("actor.advantage=ppo", "actor.advantage"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("data.path=/nonexistent/prompts.jsonl", "data.path"),
    ("actor.correction=tis", "actor.correction"),  # weights need old_logprobs=recompute
    ("actor.correction_level=batch", "actor.correction_level"),
    ("actor.is_cap=1", "actor.is_cap"),
    ("actor.vcpo_rule=cubic", "actor.vcpo_rule"),
    ("actor.vcpo_ref=0", "actor.vcpo_ref"),
    ("actor.ratio_level=group", "actor.ratio_level"),
    ("launcher=slurm", "launcher"),
    ("actor.replicas=3", "actor.replicas"),  # 16 groups per step do not split over 3 trainers
    ("actor.parallel=tensor", "actor.parallel"),
    ("actor.param_dtype=bfloat16", "actor.param_dtype"),  # FSDP's mixed precision: needs parallel=fsdp
    ("actor.parallel=fsdp actor.advantage=opob", "actor.advantage"),  # no per-trajectory gradients when sharded
    ("launcher=ray ray.placement=CLUSTERED", "ray.placement"),
    ("launcher=ray ray.rollout.cpus=-1", "ray.rollout"),
    ("launcher=ray ray.placement=PACK ray.reward.cpus=0", "ray.reward"),  # an empty bundle
    ("launcher=ray actor.device=cuda", "ray.actor.gpus"),  # Ray would hide the GPU
    ("rollout.engine=sglang", "rollout.sglang.url"),  # launching a server needs a GPU
    ("rollout.engine=sglang rollout.sglang.url=localhost:30000", "rollout.sglang.url"),
    ("rollout.engine=sglang rollout.sglang.url=http://h:1 rollout.replicas=2", "rollout.sglang.url"),
    ("rollout.engine=sglang rollout.sglang.url=http://h:1 rollout.sglang.update=nccl", "rollout.sglang.update"),
    ("rollout.engine=sglang rollout.device=cuda rollout.sglang.update=distributed", "actor.device"),
    ("rollout.engine=sglang rollout.sglang.url=http://h:1 rollout.sglang.mem_fraction=1.5", "rollout.sglang.mem_fraction"),
    ("rollout.top_k=-1", "rollout.top_k"),
    ("reward.fn=my_reward", "reward.fn"),  # not a dotted path
    ("reward.timeout_s=-1", "reward.timeout_s"),
    ("reference.dtype=int8", "reference.dtype"),
    ("actor.beta2=1", "actor.beta1/beta2"),
    ("actor.checkpoint_keep=0", "actor.checkpoint_keep"),
    ("model.tiny.num_heads=3", "model.tiny.num_heads"),  # 128 does not split into 3 heads
    ("model.tiny.num_kv_heads=3 model.tiny.num_heads=4", "model.tiny.num_kv_heads"),
    ("sync.window=0", "sync.window"),
    ("sync.dtype=bfloat16", "sync.dtype"),  # the rollout runs float32
    ("supervision.heartbeat_s=90", "supervision.heartbeat_s/hang_s"),
    ("tracking.log_every=0", "tracking.log_every"),
    ("flow.shutdown_seconds=0", "flow.shutdown_seconds"),
    ("env.agent=run_agent", "env.agent"),  # not a dotted path
    ("launcher=ray ray.env.actors=true", "ray.env.actors"),  # no environment to run
    ("env.cls=rlflow.envs.tools.ToolEnv env.agent=my.run_agent", "env.agent"),  # one or the other
])
def test_a_bad_value_fails_validation_naming_the_field(override, field):
    cfg = OmegaConf.to_object(_compose(overrides=override.split()))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.check()


def test_the_gpu_recipe_composes_and_validates_with_a_model_and_a_dataset(tiny_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_qwen", [f"model.path={tiny_model}", f"data.path={data}"]))
    cfg.check()
    assert (cfg.rollout.device, cfg.reward.fn, cfg.data.prompt_key) == ("cuda", "rlflow.tasks.rewards.math_answer", "question")


def test_the_tool_recipe_for_an_instruct_checkpoint_composes_and_validates(tiny_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("tool_qwen_sglang", [f"model.path={tiny_model}", f"data.path={data}"]))
    cfg.check()
    assert (cfg.rollout.engine, cfg.rollout.device, cfg.data.chat_template, cfg.env.observation_role) == \
        ("sglang", "cuda", True, "tool")
    assert cfg.env.kwargs == {"tools": ["rlflow.envs.tools.calc"], "format": "hermes"}
    from rlflow.envs.tools import ToolEnv

    ToolEnv(**cfg.env.kwargs)  # the kwargs build the environment


def test_the_sglang_cluster_recipe_composes_and_validates(tiny_model, tmp_path):
    pytest.importorskip("ray")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_sglang", [f"model.path={tiny_model}", f"data.path={data}"]))
    cfg.check()
    assert (cfg.launcher, cfg.rollout.engine, cfg.rollout.replicas, cfg.ray.rollout.gpus) == ("ray", "sglang", 2, 1)
    assert cfg.reward.fn == "rlflow.tasks.rewards.math_answer" and cfg.data.chat_template  # from gsm8k_qwen


def test_the_sharded_trainer_recipe_composes_and_validates(tiny_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_fsdp", [f"model.path={tiny_model}", f"data.path={data}"]))
    cfg.check()
    a = cfg.actor
    assert (a.replicas, a.parallel, a.param_dtype, a.activation_checkpointing, a.device) == \
        (4, "fsdp", "bfloat16", True, "cuda")
    assert (cfg.rollout.engine, cfg.rollout.device, cfg.rollout.sglang.tp_size) == ("sglang", "cuda:4", 4)
    assert cfg.actor.groups_per_step % cfg.actor.replicas == 0


def test_the_lora_recipe_composes_and_validates(tiny_model, tmp_path):
    pytest.importorskip("peft", reason="actor.lora needs the lora extra (peft)")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_lora", [f"model.path={tiny_model}", f"data.path={data}"]))
    cfg.check()
    assert (cfg.actor.lora.rank, cfg.actor.lora.alpha, cfg.actor.lora.target_modules[0]) == (32, 64, "q_proj")
    assert (cfg.rollout.engine, cfg.rollout.sglang.update, cfg.rollout.device) == ("sglang", "disk", "cuda:1")
    from rlflow.flow.launcher import plan_roles

    rollout = next(p for p in plan_roles(cfg) if p.role == "rollout")
    assert rollout.args.lora == cfg.actor.lora  # the rollout applies the trainer's adapters


def test_the_gpu_recipe_names_each_missing_path(tmp_path):
    result = _cli(["-cn", "gsm8k_qwen", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2 and "data.path: this recipe has no built-in task" in result.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n')
    result = _cli(["-cn", "gsm8k_qwen", f"data.path={data}", f"run_dir={tmp_path}/run"])
    out = " ".join(result.stdout.split())
    assert result.returncode == 2 and "model.path: data.chat_template=true needs a checkpoint" in out


def test_every_component_checks_its_own_fields_beside_their_declaration():
    # The rule of rlflow/errors.py: each config dataclass has a check() of its own, and RunConfig.check
    # calls them all; what RunConfig checks itself is only what ties two components together.
    from rlflow.engines.config import SGLangConfig, TinyModelConfig
    from rlflow.flow.config import DataConfig, FlowConfig, ModelConfig, RayConfig, RunConfig, TrackingConfig
    from rlflow.flow.placement.supervisor import SupervisionConfig
    from rlflow.roles.config import ActorConfig, ReferenceConfig, RewardConfig, RolloutConfig
    from rlflow.sync.config import SyncConfig

    for cls in (SGLangConfig, TinyModelConfig, DataConfig, FlowConfig, ModelConfig, RayConfig, TrackingConfig,
                SupervisionConfig, ActorConfig, ReferenceConfig, RewardConfig, RolloutConfig, SyncConfig):
        assert "check" in vars(cls), cls.__name__
        cls().check()  # the defaults pass
    with pytest.raises(ConfigError, match=r"^actor\.lr: must be > 0"):
        RunConfig(actor=ActorConfig(lr=0)).check()
    with pytest.raises(ConfigError, match=r"^trainer\.lr:"):  # the key is named where the config sits
        ActorConfig(lr=0).check("trainer")


@pytest.mark.parametrize("key", ["actor.temperature", "actor.max_new_tokens"])
def test_a_retired_key_is_refused_naming_the_key_that_replaced_it(key, tmp_path):
    replacement = "rollout." + key.split(".")[1]
    result = _cli([f"{key}=1", "tracking.wandb=false", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2 and f"{key}: no longer a setting" in result.stdout
    assert f"set {replacement} instead" in result.stdout and not (tmp_path / "run").exists()
    recipe = tmp_path / "mine.yaml"  # a user's recipe copied from one that tied the two by interpolation
    recipe.write_text(f"defaults:\n  - rlflow_schema\n  - _self_\n{key.split('.')[0]}:\n  {key.split('.')[1]}: "
                      f"${{{replacement}}}\n")
    result = _cli(["-cd", str(tmp_path), "-cn", "mine", "tracking.wandb=false", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2 and f"{recipe}: {key}: no longer a setting" in " ".join(result.stdout.split())


def test_a_resumed_runs_saved_retired_keys_are_dropped_when_tied_and_refused_when_not(tmp_path):
    from rlflow.flow.overrides import retire

    saved = OmegaConf.create({"rollout": {"temperature": 0.7, "max_new_tokens": 8},
                              "actor": {"temperature": 0.7, "max_new_tokens": 8, "lr": 1e-3}})
    retire(saved, "config.yaml")
    assert OmegaConf.to_container(saved["actor"]) == {"lr": 1e-3}
    saved = OmegaConf.create({"rollout": {"temperature": 1.0}, "actor": {"temperature": 0.7}})
    with pytest.raises(ConfigError, match=r"actor\.temperature=0\.7 but rollout\.temperature=1\.0"):
        retire(saved, "config.yaml")


def test_the_cli_exits_2_and_names_a_bad_value(tmp_path):
    result = _cli(["flow.staleness=-3", "tracking.wandb=false", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2
    assert "flow.staleness" in result.stdout and "Traceback" not in result.stdout + result.stderr


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rlflow.flow.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
