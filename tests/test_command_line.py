"""What the real `rlflow` command refuses before it starts anything, and how it says so.

Each case is a mistake a new user makes in the first hour. The contract: the exit code is 2, the message
names the setting (or the file and line) and the fix, and nothing was started or written (no run
directory, no process). Messages are printed as they are: brackets in user text survive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from helpers import REPO, env, said

CHEAP = ["tracking.wandb=false"]


def rlflow(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlflow.flow.cli", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=120)


def test_an_unknown_key_is_refused_with_the_nearest_setting_with_or_without_plus(tmp_path):
    for typo in ("+flow.stalenes=2", "flow.stalenes=2"):
        r = rlflow(f"run_dir={tmp_path / 'run'}", typo, *CHEAP)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "flow.stalenes: not a setting of rlflow" in said(r) and "did you mean flow.staleness?" in said(r)
    r = rlflow(f"run_dir={tmp_path / 'run'}", "replicas=2", *CHEAP)
    assert r.returncode == 2 and "did you mean" in said(r) and "rollout.replicas" in said(r)
    assert not (tmp_path / "run").exists()
    r = rlflow("doctor", "+flow.stalenes=2", *CHEAP)
    assert r.returncode == 1 and "did you mean flow.staleness?" in said(r)


def test_help_is_rlflows_own_and_an_unknown_recipe_lists_the_recipes():
    r = rlflow("--help")
    assert r.returncode == 0 and "Hydra" not in r.stdout.split("Hydra's own flags")[0]
    for word in ("rlflow doctor", "rlflow report RUN_DIR", "rlflow bus stats RUN_DIR", "gsm8k_qwen", "flow.staleness",
                 "resume=true", "README.md"):
        assert word in r.stdout, word
    r = rlflow("-cn", "gsm8k", *CHEAP)
    assert r.returncode == 2 and "-cn gsm8k: no such recipe" in said(r) and "default, gsm8k_fsdp, gsm8k_lora, gsm8k_qwen, gsm8k_sglang" in said(r)


def test_a_model_path_that_is_not_a_checkpoint_is_refused_naming_it_before_anything_starts(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    r = rlflow(f"run_dir={tmp_path / 'run'}", f"model.path={empty}", *CHEAP)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"model.path: '{empty}' holds no config.json" in said(r) and "Traceback" not in said(r)
    assert not (tmp_path / "run").exists()
    (empty / "config.json").write_text("{}")
    (empty / "dcp").mkdir()  # a sharded trainer's checkpoint: the message says how to make a model of it
    r = rlflow(f"run_dir={tmp_path / 'run'}", f"model.path={empty}", *CHEAP)
    assert r.returncode == 2 and f"rlflow export {empty} OUT_DIR" in said(r)


def test_a_malformed_data_line_is_refused_naming_the_file_and_its_line_before_any_role_starts(tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"{i}=", "answer": str(i)}) for i in range(50)]
    data.write_text("\n".join(lines + ['{"prompt": "50=",\n', *lines[:3]]) + "\n")  # line 51 is cut short
    r = rlflow(f"run_dir={tmp_path / 'run'}", f"data.path={data}", "reward.fn=rlflow.tasks.rewards.exact_match", *CHEAP)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"data.path='{data}', line 51: not valid JSON" in said(r) and "Traceback" not in said(r)
    assert not (tmp_path / "run").exists()
    data.write_text("\n".join(lines[:3] + [json.dumps({"question": "x"})]) + "\n")
    r = rlflow(f"run_dir={tmp_path / 'run'}", f"data.path={data}", "reward.fn=rlflow.tasks.rewards.exact_match", *CHEAP)
    assert r.returncode == 2 and "line 4: no 'prompt' field (data.prompt_key); its fields are ['question']" in said(r)


def test_user_text_keeps_its_brackets_in_errors_and_in_doctor(tmp_path):
    missing = tmp_path / "[ray]" / "prompts.jsonl"
    r = rlflow(f"run_dir={tmp_path / 'run'}", f"data.path='{missing}'", "reward.fn=rlflow.tasks.rewards.exact_match", *CHEAP)
    assert r.returncode == 2 and f"no such file: '{missing}'" in said(r)
    from rlflow.flow.doctor import main as doctor

    console = Console(record=True, width=300)
    assert doctor(["rollout.engine='my_pkg[extra].Engine'", f"data.path='{missing}'", *CHEAP], console) == 1
    rows = console.export_text().split("┡", 1)[1]  # the checks' rows, below the title (which repeats argv)
    assert "cannot import module 'my_pkg[extra]'" in rows and f"no such file: '{missing}'" in " ".join(rows.split())


def test_a_data_line_that_is_not_utf8_is_refused_naming_that_line(tmp_path):
    from rlflow.flow.config import ConfigError
    from rlflow.flow.data import read_prompts

    data = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"{i}="}).encode() for i in range(3000)]  # past any read buffer
    lines[2000] = b'{"prompt": "caf\xe9="}'  # Latin-1, not UTF-8
    data.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ConfigError, match="line 2001: not UTF-8 text .* at column 16"):
        read_prompts(str(data), "prompt")
