"""Whole runs through the `rlflow` command: real processes, a real bus, a real tiny model.

Each run is short (a few steps of a small batch); what they pin is the flow's contract, not learning
(benchmarks/async_speedup.py and the README's default run measure learning).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_all_processes_gone, command, env, metrics, rlflow, said, wait_for_step


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
    out = said(r)
    assert "reward.fn=user_code.reward_raising_on_sevens on row" in out and "sevens are not allowed" in out
    assert r.stdout.count("Traceback (most recent call last)") == 1  # one per kind of failure, then counts
    rows = metrics(run_dir)
    assert len(rows) == 4 and sum(m["reward/errors"] for m in rows) > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_errors"] == sum(m["reward/errors"] for m in rows)
    [kind] = summary["reward_errors_by_kind"]
    assert kind.startswith("ArithmeticError at user_code.py:") and f"{kind} ({summary['reward_errors']})" in out
    ledger = summary["samples"]  # a failed sample is consumed, not trained
    assert ledger["trained"] == sum(m["samples/trained"] for m in rows) and ledger["skipped"] >= summary["reward_errors"]
    assert ledger["trained"] + ledger["skipped"] == ledger["issued"] == 4 * 16


def test_a_reward_that_fails_on_every_sample_stops_the_run_naming_it_and_trains_nothing(tmp_path, tiny_model,
                                                                                         model_cache):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}=", "answer": str(n)[::-1]}) + "\n" for n in range(100, 120)))
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"model.path={tiny_model}", f"data.path={data}",
               "reward.fn=user_code.reward_returning_none", "reward.max_failed_steps=2", "flow.steps=20",
               "tracking.report=true")
    out = said(r)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "reward.fn=user_code.reward_returning_none failed on every sample of the last 2 steps" in out
    assert "returned NoneType None: a reward function must return a number" in out and "e.g. row g" in out
    assert "no advice: the run trained nothing" in out and "Traceback" not in out
    rows = metrics(run_dir)
    assert len(rows) == 2 and all(m["step/updated"] == 0 and m["samples/trained"] == 0 for m in rows)
    ledger = json.loads((run_dir / "summary.json").read_text())["samples"]
    assert ledger["trained"] == 0 and ledger["skipped"] == 2 * 16
    # a step without a sample to train makes no update: the weights after it are those before it, bit for bit
    assert all(m["sync/density"] == 0.0 for m in rows)
    assert_all_processes_gone(run_dir)


def test_a_sweep_runs_each_job_in_a_directory_of_its_own(tmp_path, tiny_model, model_cache):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = tmp_path / "sweep"  # the third job's value is refused: the others still run, the exit code says so
    r = subprocess.run([*command(sweep, model_cache, ["flow.steps=2"]), "-m", "flow.staleness=0,1,-1"], cwd=tmp_path,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_flow.staleness:0", "1_flow.staleness:1"]  # the refused job left no directory
    for job, k in zip(jobs, (0, 1)):
        rows = metrics(sweep / job)
        assert [m["step"] for m in rows] == [1, 2] and max(m["staleness/max"] for m in rows) <= k
        assert f"staleness: {k}" in (sweep / job / "config.yaml").read_text()
        path = str(sweep / job)  # a job's directory can be given back on a command line (run_dir=... resume=true)
        assert OverridesParser.create().parse_override(f"run_dir={path}").value() == path
    assert "refused (settings)" in said(r)  # the sweep's summary lists every job
    assert not list(tmp_path.rglob("*.log")) and not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


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
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_process_and_leaves_the_report_of_what_was_logged(tmp_path, tiny_model,
                                                                                       model_cache, stop):
    run_dir = tmp_path / "run"
    # As from a terminal: a shell's background job (this test suite run with `&`) would start it with
    # SIGINT ignored, and Python keeps ignoring it then, as a background job of a script should.
    proc = subprocess.Popen(command(run_dir, model_cache, ["flow.steps=10000", "tracking.report=true"]), cwd=REPO,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(run_dir, proc, 1, timeout=120)
    stats = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "bus", "stats", str(run_dir), "--json"], cwd=REPO,
                           env=env(), capture_output=True, text=True, timeout=60)  # the run's bus, by its directory
    assert stats.returncode == 0, stats.stdout + stats.stderr
    assert {"rollout", "reward", "actor"} <= json.loads(stats.stdout)["consumers"].keys()
    proc.send_signal(stop)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        exited = proc.poll()  # None: the launcher itself hangs; a code: something else holds its stdout open
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"no EOF 60s after {stop.name} (launcher exit code {exited}); processes "
                    f"{(run_dir / 'processes.json').read_text() if (run_dir / 'processes.json').exists() else '?'}; "
                    f"output:\n{out[-4000:]}")
    assert proc.returncode == 130, out
    assert "interrupted" in out and (run_dir / "report" / "index.html").exists()
    assert_all_processes_gone(run_dir)
