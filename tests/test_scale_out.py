"""Scale-out: launcher=ray (a private local Ray cluster per run) and replicated roles under both launchers.

Whole runs through the `rlflow` command, as in test_runs.py: real processes or Ray actors, a real bus,
the real tiny model. Each Ray run starts its own private cluster (about 5 s here) and must leave no
process of it behind.
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

from helpers import assert_all_processes_gone, command, env, metrics, rlflow, wait_for_step
from rlflow.flow.feeder import group_index

pytest.importorskip("ray", reason="launcher=ray needs the ray extra: pip install -e '.[ray]'")


def assert_no_ray_cluster_left(run_dir: Path) -> None:
    """No process still runs from the private cluster's temp directory (raylet, GCS, workers)."""
    temp = json.loads((run_dir / "processes.json").read_text()).get("ray_temp_dir")
    assert temp, "a ray run records its private cluster's temp directory"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            assert temp not in cmdline, f"pid {proc.name} of the private Ray cluster is still running: {cmdline[:200]}"


ON_POLICY = ["flow.staleness=0", "flow.steps=5"]  # deterministic: one rollout replica, synchronous steps


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model, model_cache) -> list[dict]:
    """The reference: the local launcher, one trainer, on-policy (shared by the comparisons below)."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    r = rlflow(run_dir, model_cache, "launcher=local", *ON_POLICY)
    assert r.returncode == 0, r.stdout + r.stderr
    local_run_dir.append(run_dir)
    return metrics(run_dir)


local_run_dir: list[Path] = []  # where ``local_run`` ran (its value stays the metrics the comparisons use)


def trained_groups(run_dir: Path) -> list[list[str]]:
    from rlflow.train.checkpoint import read_state

    return read_state(run_dir / "checkpoints" / "final")["groups_by_step"]


def test_the_ray_launcher_trains_bit_for_bit_like_the_local_one(tmp_path, local_run, model_cache):
    """At staleness 0 with one rollout replica a run is deterministic, so the launchers must agree exactly."""
    run_dir = tmp_path / "ray"
    r = rlflow(run_dir, model_cache, "launcher=ray", *ON_POLICY)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    for key in ("reward/mean", "loss", "samples", "staleness/max"):
        assert [m[key] for m in rows] == [m[key] for m in local_run], key
    # The same groups trained, under ids no one could know before each run issued them (a random part per run)
    ours, theirs = trained_groups(run_dir), trained_groups(local_run_dir[0])
    assert [[group_index(g) for g in s] for s in ours] == [[group_index(g) for g in s] for s in theirs]
    nonces = {g.partition(".")[2] for s in ours for g in s} | {g.partition(".")[2] for s in theirs for g in s}
    assert len(nonces) == 2 and all(len(n) == 8 for n in nonces), nonces
    pids = json.loads((run_dir / "processes.json").read_text())
    assert pids["kind"] == "ray" and set(pids["roles"]) == {"actor-0", "rollout-0", "reward-0"}
    assert_all_processes_gone(run_dir)
    assert_no_ray_cluster_left(run_dir)


# Under Ray the same replicas run as actors; kept out of the default run for time (Ray is covered by the others)
@pytest.mark.parametrize("launcher", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_two_data_parallel_trainers_take_the_steps_one_trainer_takes(tmp_path, local_run, model_cache, launcher):
    """Each replica trains half of each step's groups; the summed gradient is the whole batch's, so the
    run matches one trainer's (same samples, losses equal up to float summation order) and the
    replicas end with bit-identical weights."""
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, f"launcher={launcher}", "actor.replicas=2", *ON_POLICY)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["reward/mean"] for m in rows] == [m["reward/mean"] for m in local_run]
    assert [m["loss"] for m in rows] == pytest.approx([m["loss"] for m in local_run], rel=1e-5, abs=1e-7)
    assert [m["ess/ratio"] for m in rows] == pytest.approx([m["ess/ratio"] for m in local_run], rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"] == {"replicas": 2, "identical_weights": True}
    assert summary["samples"]["trained"] == summary["samples"]["issued"] == 80
    assert summary["samples"]["consumed_more_than_once"] == 0
    assert_all_processes_gone(run_dir)


# The Ray case also runs placement groups; the Ray kill test checks exactly-once under Ray in the default run
@pytest.mark.parametrize("launcher", [pytest.param(["launcher=local"], id="local"),
                                      pytest.param(["launcher=ray", "ray.placement=PACK"], id="ray",
                                                   marks=pytest.mark.slow)])
def test_with_two_rollout_and_two_reward_replicas_every_sample_trains_exactly_once(tmp_path, tiny_model,
                                                                                  model_cache, launcher):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, *launcher, "rollout.replicas=2", "reward.replicas=2", "flow.steps=8",
               "rollout.groups_per_call=1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert len(rows) == 8 and sum(m["samples"] for m in rows) == 8 * 4 * 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == {"issued": 128, "trained": 128, "skipped": 0, "filtered": 0, "consumed_more_than_once": 0,
                                  "issued_not_consumed": 0, "consumed_not_issued": 0}
    work = summary["samples_by_replica"]
    for role in ("rollout", "reward"):  # the bus spread the work: every replica took some
        assert work.get(f"{role}-0", 0) > 0 and work.get(f"{role}-1", 0) > 0, work
        assert work[f"{role}-0"] + work[f"{role}-1"] == 128, work
    assert_all_processes_gone(run_dir)
    if "launcher=ray" in launcher:
        assert_no_ray_cluster_left(run_dir)


def test_a_ray_role_actor_killed_mid_run_is_restarted_in_a_new_actor_and_nothing_is_lost(tmp_path, tiny_model,
                                                                                         model_cache):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, model_cache, ["launcher=ray", "flow.steps=12"]),
                            cwd=Path(__file__).resolve().parents[1], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, proc, 3, timeout=90)
        victim = json.loads((run_dir / "processes.json").read_text())["roles"]["rollout-0"]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    [restart] = summary["supervision"]["restarts"]
    assert restart["replica"] == "rollout-0" and restart["action"] == "restarted" and "died" in restart["what"]
    assert summary["samples"]["issued"] == summary["samples"]["trained"] == 12 * 16
    assert summary["samples"]["consumed_more_than_once"] == 0
    assert json.loads((run_dir / "processes.json").read_text())["roles"]["rollout-0"] != victim
    assert_all_processes_gone(run_dir)
    assert_no_ray_cluster_left(run_dir)


@pytest.mark.slow  # the same control socket carries every step's metrics in the other Ray runs
def test_a_failing_ray_role_stops_the_run_with_its_traceback(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "launcher=ray", "rollout.engine=user_code.CrashingEngine", "flow.steps=20",
               "supervision.max_restarts=0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "role rollout-0 failed" in r.stdout and "engine exploded on purpose" in r.stdout
    assert "pid=" in r.stdout and "CrashingEngine: call 1" in r.stdout  # a role's print, with Ray's log prefix
    assert "\x1b[" not in r.stdout + r.stderr  # uncoloured in a pipe
    assert_all_processes_gone(run_dir)
    assert_no_ray_cluster_left(run_dir)


def test_a_request_no_node_can_meet_fails_naming_the_replica_and_what_it_asked(tmp_path, tiny_model, model_cache):
    run_dir = tmp_path / "run"
    r = rlflow(run_dir, model_cache, "launcher=ray", "+ray.rollout.custom.inference_node=1", "flow.steps=3")
    assert r.returncode == 1, r.stdout + r.stderr
    text = " ".join((r.stdout + r.stderr).split())  # rich wraps long lines
    assert "no node of the private Ray cluster can meet rollout-0's request" in text, text[-3000:]
    assert "inference_node" in text and "Traceback" not in text, text[-3000:]


HOLDER = """
import json, sys, tempfile, ray
ray.init(address="local", num_cpus=6, include_dashboard=False, object_store_memory=100 << 20,
         _temp_dir=sys.argv[1], logging_level="ERROR")
print(json.dumps({"address": ray.get_runtime_context().gcs_address}), flush=True)
for line in sys.stdin:
    if line.strip() == "actors":
        named = ray.util.list_named_actors(all_namespaces=True)
        print(json.dumps({"alive": [a["name"] for a in named]}), flush=True)
    else:
        break
ray.shutdown()
"""


@pytest.mark.slow  # 40 s of two clusters; the private-cluster runs cover the launcher in the default run
def test_ray_address_joins_a_running_cluster_and_leaves_it_running_without_its_actors(tmp_path, tiny_model,
                                                                                     model_cache, short_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{short_dir}/r"], env=env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(holder.stdout.readline())["address"]
        run_dir = tmp_path / "run"
        r = rlflow(run_dir, model_cache, "launcher=ray", f"ray.address={address}", "flow.steps=3",
                   "reward.replicas=2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"joined {address}" in " ".join(r.stdout.split())
        assert json.loads((run_dir / "summary.json").read_text())["samples"]["consumed_more_than_once"] == 0
        holder.stdin.write("actors\n")
        holder.stdin.flush()
        alive = json.loads(holder.stdout.readline())["alive"]  # the cluster still answers: it was not stopped
        assert not [a for a in alive if a.startswith("rlflow")], alive
        assert_all_processes_gone(run_dir)
    finally:
        holder.stdin.close()
        try:
            holder.wait(30)
        except subprocess.TimeoutExpired:
            holder.kill()


@pytest.mark.slow  # the local Ctrl-C test and the Ray kill test cover both halves in the default run
def test_ctrl_c_under_ray_stops_the_run_and_its_private_cluster(tmp_path, tiny_model, model_cache):
    """A terminal's Ctrl-C reaches the whole process group: the launcher and the cluster it started."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, model_cache, ["launcher=ray", "flow.steps=10000"]),
                            cwd=Path(__file__).resolve().parents[1], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never reached its first step"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and "interrupted" in out, out[-3000:]
    assert_all_processes_gone(run_dir)
    assert_no_ray_cluster_left(run_dir)
