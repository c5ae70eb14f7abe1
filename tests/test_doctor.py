"""`rlflow doctor`: what it finds on a good recipe, and that each problem is named with its fix."""

from __future__ import annotations

import json

from rlflow.flow.doctor import main


def _checks(capsys, *argv: str) -> tuple[int, dict[str, dict]]:
    code = main(["--json", *argv])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return code, {c["name"]: c for c in json.loads(last)}


def test_the_default_recipe_passes_every_check(capsys):
    code, checks = _checks(capsys)
    assert code == 0, checks
    assert all(c["status"] == "ok" for c in checks.values())
    assert {"python", "package torch", "zmq CURVE", "recipe", "model", "data", "devices", "disk (run_dir)",
            "socket dir"} <= checks.keys()


def test_an_environment_is_built_with_its_kwargs_and_a_bad_one_is_named(capsys):
    code, checks = _checks(capsys, "-cn", "tool_calc")
    assert code == 0 and checks["env.cls"]["status"] == "ok", checks
    code, checks = _checks(capsys, "-cn", "tool_calc", "env.kwargs.format=xml")
    assert code == 1 and checks["env.cls"]["status"] == "FAIL"
    assert "env.kwargs.format='xml': choose one of ['call', 'hermes']" in checks["env.cls"]["detail"]


def test_an_agent_is_checked_against_what_each_episode_passes_it(capsys):
    code, checks = _checks(capsys, "-cn", "agent_calc")
    assert code == 0 and checks["env.agent"]["status"] == "ok", checks
    code, checks = _checks(capsys, "-cn", "agent_calc", "+env.kwargs.retries=3")  # run_agent takes no retries
    assert code == 1 and checks["env.agent"]["status"] == "FAIL"
    assert "unexpected keyword argument 'retries'" in checks["env.agent"]["detail"]


def test_each_problem_fails_its_check_naming_the_field_and_the_fix(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    code, checks = _checks(capsys, "-cn", "gsm8k_qwen", f"model.path={tmp_path}/missing", f"data.path={data}",
                           "rollout.engine=no_such.Engine", f"resume={tmp_path}", "data.filter_groups=true",
                           "data.filter_fn=no_such.keep")
    assert code == 1
    assert checks["recipe"]["status"] == "FAIL" and "model.path" in checks["recipe"]["detail"]
    assert checks["model"]["status"] == "FAIL" and "is not a directory: give a checkpoint directory" in checks["model"]["detail"]
    reward = checks["reward.fn"]  # math_answer(response, answer) and the data has no `answer` column
    assert reward["status"] == "FAIL" and "['answer']" in reward["detail"] and "solution" in reward["detail"]
    assert checks["rollout.engine"]["status"] == "FAIL" and "cannot import module 'no_such'" in checks["rollout.engine"]["detail"]
    assert checks["data.filter_fn"]["status"] == "FAIL" and "data.filter_fn='no_such.keep'" in checks["data.filter_fn"]["detail"]
    assert checks["devices"]["status"] == "FAIL" and "torch sees no GPU" in checks["devices"]["detail"]
    assert checks["resume"]["status"] == "FAIL" and "not a checkpoint directory" in checks["resume"]["detail"]


def test_lora_targets_are_checked_on_the_models_skeleton_before_any_weight_is_read(capsys, tiny_model):
    code, checks = _checks(capsys, f"model.path={tiny_model}", "actor.lora.rank=8")
    assert code == 0 and checks["LoRA targets"]["status"] == "ok", checks
    assert "38,912 adapter parameters" in checks["LoRA targets"]["detail"]
    for targets, message in (("[qkv_proj]", "its linear layers are named"),
                             ("[q_proj,lm_head]", "shares its weight with the input embeddings")):
        code, checks = _checks(capsys, f"model.path={tiny_model}", "actor.lora.rank=8",
                               f"actor.lora.target_modules={targets}")
        assert code == 1 and checks["LoRA targets"]["status"] == "FAIL"
        assert "actor.lora.target_modules" in checks["LoRA targets"]["detail"] and message in checks["LoRA targets"]["detail"]
