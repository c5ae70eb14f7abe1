"""Whole runs through the `rlflow` command: real processes, a real bus, a real tiny model.

Each run is short (a few steps of a small batch); what they pin is the flow's contract, not learning
(benchmarks/async_speedup.py and the README's default run measure learning).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["actor.groups_per_step=4", "rollout.group_size=4", "rollout.groups_per_call=4", "tracking.wandb=false",
         "tracking.report=false"]  # the report's few seconds are tested once, in test_report.py


def rlflow(run_dir: Path, model_cache: str, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_command(run_dir, model_cache, overrides), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _command(run_dir: Path, model_cache: str, overrides) -> list[str]:
    return [sys.executable, "-m", "flow.cli", f"run_dir={run_dir}", f"model.cache_dir={model_cache}", *SMALL,
            *overrides]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("WANDB_API_KEY", None)
    return env


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_all_processes_gone(run_dir: Path) -> None:
    pids = json.loads((run_dir / "processes.json").read_text())
    for name, pid in [("bus", pids["bus"]), *pids["roles"].items()]:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "?"
        pytest.fail(f"{name} (pid {pid}) is still there after the run, state {state}")


def test_staleness_0_trains_only_on_current_samples_and_logs_everywhere(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "flow.staleness=0", "flow.steps=5", "tracking.wandb=true",
               "tracking.wandb_mode=offline")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5]
    for m in rows:
        assert {"time", "reward/mean", "staleness/max", "staleness/mean", "sync/bytes", "sync/dense_bytes",
                "sync/density", "sync/encode_s"} <= m.keys()
        assert m["staleness/max"] == 0 and m["samples"] == 16
    # At staleness 0 every version is applied before the next step's samples: each line has the applies.
    assert all(m["sync/bit_exact"] == 1.0 and m["sync/apply_s"] > 0 for m in rows)
    assert (run_dir / "checkpoints/final/config.json").exists() and (run_dir / "config.yaml").exists()
    assert_all_processes_gone(run_dir)
    wandb = Path(sys.executable).parent / "wandb"
    offline = next((run_dir / "wandb").glob("offline-run-*"))
    inspected = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(offline)],
                               capture_output=True, text=True, timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["summary"]["reward/mean"] == pytest.approx(rows[-1]["reward/mean"])


@pytest.mark.parametrize("k,extra", [(1, ["actor.kl_coef=0.05"]), (2, ["rollout.replicas=2"])])
def test_no_sample_trains_with_staleness_above_k(tmp_path, tiny_model, model_cache, k, extra):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"flow.staleness={k}", "flow.steps=8", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    staleness = [m["staleness/max"] for m in rows]
    assert len(staleness) == 8 and max(staleness) <= k, staleness
    if "actor.kl_coef=0.05" in extra:  # the reference role ran and its logprobs reached the loss
        assert all("actor/kl" in m for m in rows) and rows[-1]["actor/kl"] > 0
    assert_all_processes_gone(run_dir)


def test_weights_reach_a_chain_of_bf16_replicas_bit_exact_and_mostly_through_the_peer(tmp_path, tiny_model,
                                                                                    model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "flow.steps=6", "rollout.replicas=2", "rollout.dtype=bfloat16",
               "actor.lr=1e-5", "sync.fanout=1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert all(m["sync/density"] < 0.5 and m["sync/bytes"] < m["sync/dense_bytes"] for m in rows[1:])
    assert all(m["sync/bit_exact"] == 1.0 for m in rows if "sync/bit_exact" in m)
    sync = json.loads((run_dir / "summary.json").read_text())["sync"]
    assert sync["rollout-0"]["refused"] == sync["rollout-1"]["refused"] == 0
    assert sync["rollout-0"]["applied"] >= 2 and sync["rollout-1"]["applied"] >= 2
    assert sync["rollout-1"]["from_peers_bytes"] > 0 and sync["rollout-0"]["from_peers_bytes"] == 0
    assert sync["rollout-1"]["from_actor_bytes"] < sync["rollout-1"]["from_peers_bytes"]


def test_fully_async_runs_and_measures_staleness(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "flow.staleness=null", "flow.steps=6")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert len(rows) == 6 and all(m["staleness/max"] >= m["staleness/mean"] >= 0 for m in rows)


def test_a_raising_user_reward_is_reported_and_its_samples_skipped(tmp_path, tiny_model, model_cache):
    data = tmp_path / "prompts.jsonl"
    with data.open("w") as f:
        for s in ("123", "4567", "890", "2468", "13579", "31"):
            f.write(json.dumps({"text": s + "=", "expected": s[::-1]}) + "\n")
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"model.path={tiny_model}", f"data.path={data}", "data.prompt_key=text",
               "reward.fn=user_code.reward_raising_on_sevens", "flow.steps=4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reward function raised on row" in r.stdout and "sevens are not allowed" in r.stdout
    rows = metrics(run_dir)
    assert len(rows) == 4 and sum(m["reward/errors"] for m in rows) > 0
    assert json.loads((run_dir / "summary.json").read_text())["reward_errors"] == sum(m["reward/errors"] for m in rows)


def test_a_role_that_keeps_failing_is_restarted_up_to_its_budget_then_stops_the_run_with_a_report(
        tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "rollout.engine=user_code.CrashingEngine", "flow.steps=20",
               "supervision.max_restarts=1")
    assert r.returncode == 1
    assert "role rollout-0 failed" in r.stdout and "engine exploded on purpose" in r.stdout
    assert "not restarted: it already restarted 1 time(s)" in r.stdout
    history = json.loads((run_dir / "summary.json").read_text())["supervision"]["restarts"]
    assert [(h["replica"], h["incarnation"], h["action"]) for h in history] == [
        ("rollout-0", 0, "restarted"), ("rollout-0", 1, "stopped the run")]
    assert_all_processes_gone(run_dir)


def test_a_bad_plug_in_path_fails_at_start_naming_the_field(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "reward.fn=no_such_module.score", "flow.steps=3")
    assert r.returncode == 1 and "reward.fn='no_such_module.score'" in r.stdout
    assert_all_processes_gone(run_dir)


@pytest.mark.timeout(300)  # room for its own bounds (first step, then 60s to EOF) and the diagnostic
def test_ctrl_c_stops_every_process(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_command(run_dir, model_cache, ["flow.steps=10000"]), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never reached its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        exited = proc.poll()  # None: the launcher itself hangs; a code: something else holds its stdout open
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"no EOF 60s after Ctrl-C (launcher exit code {exited}); processes "
                    f"{(run_dir / 'processes.json').read_text() if (run_dir / 'processes.json').exists() else '?'}; "
                    f"output:\n{out[-4000:]}")
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert_all_processes_gone(run_dir)
