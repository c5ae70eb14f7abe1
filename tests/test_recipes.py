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

from rlflow.flow.config import ConfigError, register, validate

REPO = Path(__file__).resolve().parents[1]


def _compose(name: str = "default", overrides: list[str] = ()):
    register()
    with initialize_config_module(config_module="rlflow.recipes", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_the_default_recipe_composes_and_validates():
    cfg = OmegaConf.to_object(_compose(overrides=["run_dir=/tmp/x"]))
    validate(cfg)
    assert cfg.actor.temperature == cfg.rollout.temperature and cfg.model.path is None


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
    ("launcher=ray ray.placement=CLUSTERED", "ray.placement"),
    ("launcher=ray ray.rollout.cpus=-1", "ray.rollout"),
    ("launcher=ray ray.placement=PACK ray.reward.cpus=0", "ray.reward"),  # an empty bundle
    ("launcher=ray actor.device=cuda", "ray.actor.gpus"),  # Ray would hide the GPU
    ("rollout.engine=sglang", "rollout.sglang.url"),  # launching a server needs a GPU
    ("rollout.engine=sglang rollout.sglang.url=localhost:30000", "rollout.sglang.url"),
    ("rollout.engine=sglang rollout.sglang.url=http://h:1 rollout.replicas=2", "rollout.sglang.url"),
    ("rollout.engine=sglang rollout.sglang.url=http://h:1 rollout.sglang.update=nccl", "rollout.sglang.update"),
    ("rollout.engine=sglang rollout.device=cuda rollout.sglang.update=distributed", "actor.device"),
])
def test_a_bad_value_fails_validation_naming_the_field(override, field):
    cfg = OmegaConf.to_object(_compose(overrides=override.split()))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg)


def test_the_gpu_recipe_composes_and_validates_with_a_model_and_a_dataset(tiny_model, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_qwen", [f"model.path={tiny_model}", f"data.path={data}"]))
    validate(cfg)
    assert (cfg.rollout.device, cfg.reward.fn, cfg.data.prompt_key) == ("cuda", "rlflow.tasks.rewards.math_answer", "question")


def test_the_sglang_cluster_recipe_composes_and_validates(tiny_model, tmp_path):
    pytest.importorskip("ray")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2 #### 2"}) + "\n")
    cfg = OmegaConf.to_object(_compose("gsm8k_sglang", [f"model.path={tiny_model}", f"data.path={data}"]))
    validate(cfg)
    assert (cfg.launcher, cfg.rollout.engine, cfg.rollout.replicas, cfg.ray.rollout.gpus) == ("ray", "sglang", 2, 1)
    assert cfg.reward.fn == "rlflow.tasks.rewards.math_answer" and cfg.data.chat_template  # from gsm8k_qwen


def test_the_gpu_recipe_names_each_missing_path(tmp_path):
    result = _cli(["-cn", "gsm8k_qwen", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2 and "data.path: this recipe has no built-in task" in result.stdout
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n')
    result = _cli(["-cn", "gsm8k_qwen", f"data.path={data}", f"run_dir={tmp_path}/run"])
    out = " ".join(result.stdout.split())
    assert result.returncode == 2 and "model.path: data.chat_template=true needs a checkpoint" in out


def test_the_cli_exits_2_and_names_a_bad_value(tmp_path):
    result = _cli(["flow.staleness=-3", "tracking.wandb=false", f"run_dir={tmp_path}/run"])
    assert result.returncode == 2
    assert "flow.staleness" in result.stdout and "Traceback" not in result.stdout + result.stderr


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "rlflow.flow.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
