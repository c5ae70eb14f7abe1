"""Runs that lose a process mid-run and finish anyway: real processes killed with real signals.

What they pin (flow/placement/supervisor.py): a rollout, reward or reference replica that dies (SIGKILL) or
freezes (SIGSTOP: no heartbeat) is restarted in place; the rows it held go back to the bus at once;
the run finishes every step with every issued sample trained exactly once by its own ledger; and the
reward curve stays within noise of an undisturbed run with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO, assert_all_processes_gone, command, env, metrics, rss_mb, wait_for_step

STEPS, KILL_AT = 16, 5
SAMPLES = STEPS * 4 * 4  # steps x groups_per_step x group_size (test_runs.SMALL)
# A KL term, so that a reference replica runs too; a short hang bound, so a frozen replica is found quickly.
BASE = [f"flow.steps={STEPS}", "actor.kl_coef=0.01", "supervision.hang_s=4", "supervision.heartbeat_s=0.5"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, tiny_model, model_cache) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    r = subprocess.run(command(run_dir, model_cache, BASE), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return metrics(run_dir)


def run_and_signal(run_dir: Path, model_cache: str, target: str, sig: signal.Signals, at_step: int,
                   *overrides: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run rlflow; once ``at_step`` steps are logged, send ``sig`` to the ``target`` replica's process."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out, err = run_dir.parent / "stdout.log", run_dir.parent / "stderr.log"  # files: nobody reads a pipe meanwhile
    with open(out, "w") as stdout, open(err, "w") as stderr:
        p = subprocess.Popen(command(run_dir, model_cache, [*BASE, *overrides]), cwd=REPO, env=env(),
                             stdout=stdout, stderr=stderr, text=True)
        victim, deadline = None, time.monotonic() + 240
        try:
            while victim is None and p.poll() is None and time.monotonic() < deadline:
                log = run_dir / "metrics.jsonl"
                if log.exists() and len(log.read_text().splitlines()) >= at_step:
                    victim = json.loads((run_dir / "processes.json").read_text())["roles"][target]
                    os.kill(victim, sig)
                time.sleep(0.05)
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
    result = subprocess.CompletedProcess(p.args, p.returncode, out.read_text(), err.read_text())
    assert victim is not None, f"the run never reached step {at_step}: rc {p.returncode}\n{result.stdout}{result.stderr}"
    return result, victim


def assert_within_noise(disturbed: list[dict], undisturbed: list[dict], after: int) -> None:
    """Mean reward of the steps after ``after``: the two runs agree within 4 standard errors."""
    a = [m["reward/mean"] for m in disturbed if m["step"] > after]
    b = [m["reward/mean"] for m in undisturbed if m["step"] > after]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var = lambda xs, mu: sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
    se = math.sqrt(var(a, mean_a) / len(a) + var(b, mean_b) / len(b))
    assert abs(mean_a - mean_b) <= 4 * se + 1e-3, (mean_a, mean_b, se)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("target, sig, what", [
    pytest.param("rollout-0", signal.SIGKILL, "exited with code -9", id="kill-rollout"),
    # the same restart path as a rollout's, minus the weights: kept out of the default run for time
    pytest.param("reward-0", signal.SIGKILL, "exited with code -9", id="kill-reward", marks=pytest.mark.slow),
    pytest.param("reference-0", signal.SIGKILL, "exited with code -9", id="kill-reference", marks=pytest.mark.slow),
    pytest.param("rollout-0", signal.SIGSTOP, "hung: no heartbeat", id="freeze-rollout"),
])
def test_a_replica_killed_or_frozen_mid_run_is_restarted_and_every_sample_trains_exactly_once(
        tmp_path, model_cache, undisturbed, target, sig, what):
    run_dir = tmp_path / "run"
    r, victim = run_and_signal(run_dir, model_cache, target, sig, KILL_AT)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run_dir)
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == {"issued": SAMPLES, "trained": SAMPLES, "skipped": 0, "filtered": 0, "consumed_more_than_once": 0,
                                  "issued_not_consumed": 0, "consumed_not_issued": 0}
    [restart] = summary["supervision"]["restarts"]
    assert restart["replica"] == target and restart["action"] == "restarted" and what in restart["what"]
    assert restart["incarnation"] == 0 and "ready_s" in restart  # the new incarnation came up and worked
    assert rows[-1]["supervision/restarts"] == 1
    assert json.loads((run_dir / "processes.json").read_text())["roles"][target] != victim
    assert not pid_alive(victim)  # a frozen replica is killed, not left behind
    assert_within_noise(rows, undisturbed, KILL_AT)
    assert_all_processes_gone(run_dir)


def assert_each_step_once_and_every_sample_trained_once(run_dir: Path, steps: int = STEPS) -> None:
    samples = SAMPLES // STEPS * steps
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, steps + 1))
    assert json.loads((run_dir / "summary.json").read_text())["samples"] == {
        "issued": samples, "trained": samples, "skipped": 0, "filtered": 0, "consumed_more_than_once": 0, "issued_not_consumed": 0,
        "consumed_not_issued": 0}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim_rank, trainer", [
    pytest.param("actor-0", [], id="one-trainer"),
    # a sharded rank: the other rank is stuck in a collective with the dead one; the whole group rewinds
    pytest.param("actor-1", ["actor.replicas=2", "actor.parallel=fsdp"], id="fsdp-rank-1"),
    # adapters: the restarted trainer builds the start model and loads the checkpoint's adapters onto it
    pytest.param("actor-0", ["actor.lora.rank=8", "actor.lr=2e-3"], id="lora"),
])
def test_a_trainer_killed_mid_run_restarts_from_its_checkpoint_and_no_sample_trains_twice(
        tmp_path, model_cache, undisturbed, victim_rank, trainer):
    run_dir = tmp_path / "run"
    r, victim = run_and_signal(run_dir, model_cache, victim_rank, signal.SIGKILL, 8, "actor.checkpoint_every=5",
                               *trainer)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_each_step_once_and_every_sample_trained_once(run_dir)
    [restart] = json.loads((run_dir / "summary.json").read_text())["supervision"]["restarts"]
    # a dead rank breaks its peer's collective at once: either failure may be the one the run acts on
    assert restart["replica"] in ({victim_rank} if "actor.replicas=2" not in trainer else {"actor-0", "actor-1"})
    assert restart["rewound_to"] in (5, 10) and "ready_s" in restart
    assert "the trainer restarts from" in r.stdout and not pid_alive(victim)
    if "actor.lora.rank=8" in trainer:  # another experiment than the undisturbed run's
        assert (run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert_within_noise(metrics(run_dir), undisturbed, 10)
    assert_all_processes_gone(run_dir)


@pytest.mark.timeout(300)
def test_a_run_killed_whole_resumes_with_resume_true_and_finishes_with_each_sample_trained_once(
        tmp_path, model_cache, undisturbed):
    run_dir = tmp_path / "run"
    p = subprocess.Popen(command(run_dir, model_cache, [*BASE, "actor.checkpoint_every=5"]), cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, p, 12)
    p.kill()  # the launcher itself: every role and the bus go with it
    p.communicate(timeout=60)
    pids = json.loads((run_dir / "processes.json").read_text())
    deadline = time.monotonic() + 20
    while any(pid_alive(pid) for pid in [pids["bus"], *pids["roles"].values()]):
        assert time.monotonic() < deadline, f"processes outlived their killed launcher: {pids}"
        time.sleep(0.1)
    assert len(metrics(run_dir)) >= 12 and not (run_dir / "summary.json").exists()
    r = subprocess.run(command(run_dir, model_cache, [*BASE, "actor.checkpoint_every=5", "resume=true"]), cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    said = " ".join(r.stdout.split())  # the console wraps long lines
    assert "resuming from" in said and f": step 10 of {STEPS}" in said
    assert_each_step_once_and_every_sample_trained_once(run_dir)
    assert_within_noise(metrics(run_dir), undisturbed, 10)
    assert_all_processes_gone(run_dir)


def test_resume_continues_the_runs_own_settings_and_refuses_changes_to_the_experiment(tmp_path, model_cache):
    """The run is the user's own task (data file, reward function, a tiny model built for the data); the
    resume command line names only the run and more steps, as a user would type it."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"rev {n}=", "answer": str(n)[::-1]}) + "\n" for n in range(100, 140)))
    run_dir = tmp_path / "run"
    first = [f"data.path={data}", "reward.fn=rlflow.tasks.rewards.positional_match", "flow.steps=4", "actor.checkpoint_every=2",
             "tracking.samples_every=1"]
    r = subprocess.run(command(run_dir, model_cache, first), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = (run_dir / "config.yaml").read_text()
    r = subprocess.run(command(run_dir, model_cache, ["resume=true", "flow.steps=6"]), cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "changed: flow.steps: 4 -> 6" in " ".join(r.stdout.split())
    prompts = {json.loads(line)["step"]: json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").open()}
    assert sorted(prompts) == [1, 2, 3, 4, 5, 6] and all(p.startswith("rev 1") for p in prompts.values()), prompts
    assert (run_dir / "config.yaml").read_text() == saved.replace("steps: 4", "steps: 6")
    [resumed] = [json.loads(line) for line in (run_dir / "resumes.jsonl").open()]
    assert resumed["step"] == 4 and resumed["changed"] == {"flow.steps": [4, 6]}
    assert json.loads((run_dir / "summary.json").read_text())["samples"]["consumed_more_than_once"] == 0
    r = subprocess.run(command(run_dir, model_cache, ["resume=true", "flow.steps=8", "data.task=sort",
                                                       "reward.fn=rlflow.tasks.rewards.exact_match"]),
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    said = " ".join(r.stdout.split())
    assert r.returncode == 2 and "would change the run's experiment" in said, r.stdout + r.stderr
    assert "data.task='sort' (the run has 'reverse')" in said and "reward.fn='rlflow.tasks.rewards.exact_match'" in said
    assert f"model.path={run_dir}/checkpoints/final" in said
    assert (run_dir / "config.yaml").read_text() == saved.replace("steps: 4", "steps: 6")


def test_resume_refuses_a_run_dir_without_checkpoints_and_a_fresh_run_refuses_an_used_run_dir(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    r = subprocess.run(command(run_dir, model_cache, ["resume=true"]), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "has no checkpoint to continue from" in " ".join(r.stdout.split())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    r = subprocess.run(command(run_dir, model_cache, []), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    said = " ".join(r.stdout.split())
    assert r.returncode == 2 and "already holds a run" in said and "resume=true" in said


@pytest.mark.timeout(300)
def test_thousands_of_hostile_messages_leave_a_real_run_unaffected_and_within_its_memory(
        tmp_path, model_cache, undisturbed):
    import random

    import zmq
    from fuzz import Peers, bus_message, channel_message, control_message
    from rlflow.transfer import BusClient, Unauthorized
    from rlflow.transfer.channel import Client, Head, ObjectInfo

    run_dir, steps = tmp_path / "run", 200  # long enough to be training all through the flood and the probe after it
    log = open(tmp_path / "run.log", "w")  # a file, not a pipe nobody reads during the flood
    p = subprocess.Popen(command(run_dir, model_cache, [*BASE, f"flow.steps={steps}"]), cwd=REPO, env=env(),
                         stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, p, 2)
        pids = json.loads((run_dir / "processes.json").read_text())
        [sock_dir] = Path("/tmp").glob(f"rlflow-{pids['launcher']}-*")
        bus_address = f"ipc://{sock_dir}/bus"
        channel_address = (sock_dir / "weights.endpoint").read_text()
        watched = {"bus": pids["bus"], "actor-0": pids["roles"]["actor-0"]}
        before = {name: rss_mb(pid) for name, pid in watched.items()}
        with BusClient(bus_address) as probe:
            errors_before = probe.stats()["errors"]
        rng, bus, channel = random.Random(7), Peers(bus_address, 4), Peers(channel_address, 4)
        control = Peers(f"ipc://{sock_dir}/control", 2, zmq.PUSH)
        peak = dict(before)
        for i in range(4000):
            bus.send(bus_message(rng))
            if i % 2 == 0:
                channel.send(channel_message(rng))
            if i % 4 == 0:
                control.send(control_message(rng))
            if i % 500 == 0:
                peak = {name: max(peak[name], rss_mb(pid)) for name, pid in watched.items()}
                time.sleep(0.05)  # spread the flood over the run
        bus.close()
        channel.close()
        control.close()
        assert p.poll() is None, "the run ended before the flood did: make it longer"
        with BusClient(bus_address) as intruder:  # a peer of the run's bus without the run's credentials
            for poison in (lambda: intruder.get("reward", ["response_ids", "fields"], n=8, timeout=0),
                           lambda: intruder.put({"uid": ["g3-0"], "reward": [1.0]}),
                           lambda: intruder.release("actor-0.0"), lambda: intruder.clear(everything=True)):
                with pytest.raises(Unauthorized):
                    poison()
            errors = intruder.stats()["errors"] - errors_before
        reader = Client(channel_address, reply_grace=5.0)  # and of its weight channel, without the run's key
        try:
            with pytest.raises(Unauthorized, match="valid token"):
                reader.head(-1)
            with pytest.raises(Unauthorized, match="valid token"):
                reader.fetch(Head(0, {}, {"full-0": ObjectInfo(1, ["0"])}), "full-0", timeout=1)
        finally:
            reader.close()
        peak = {name: max(peak[name], rss_mb(pid)) for name, pid in watched.items()}
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert p.returncode == 0, out[-3000:]
    assert bus.sent == 4000 and channel.sent == 2000 and control.sent == 1000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["control_refused"] >= 800, summary["control_refused"]  # all but the heartbeats of replica 99
    assert (run_dir / "checkpoints" / "final" / "trainer_state.json").is_file()  # the forged 'done's ended nothing
    assert errors >= 2500, errors  # most of them were refused, each with an error reply
    assert bus.replies >= 3500 and channel.replies >= 1500, (bus.replies, channel.replies)
    assert_each_step_once_and_every_sample_trained_once(run_dir, steps)
    rows = metrics(run_dir)
    assert all(m.get("sync/bit_exact", 1.0) == 1.0 for m in rows)
    assert_within_noise(rows[:STEPS], undisturbed, 2)
    for name in watched:  # bounded queues and bounded bookkeeping: no growth beyond a small margin
        assert peak[name] - before[name] < 150, (name, before[name], peak[name])
    assert "internal error" not in out, out[-3000:]
