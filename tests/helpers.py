"""What the tests share: running the `rlflow` command as a user would, reading what a run wrote, waiting
for a run to reach a step, and waiting for the bus to hold a parked request (never a settle sleep).

Bus fixtures (a server on a unique ipc path, clients) and the tiny model are in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHANNEL_SECRET = b"rlflow-tests-weight-channel-key!"  # the same in a spawned test process (a run makes a random one)
SMALL = ["actor.groups_per_step=4", "rollout.group_size=4", "rollout.groups_per_call=4", "tracking.wandb=false",
         "tracking.report=false"]  # the report's few seconds are tested once, in test_report.py


def command(run_dir: Path, model_cache: str, overrides) -> list[str]:
    """A small run of ``rlflow`` in ``run_dir`` with the session's tiny model cache."""
    return [sys.executable, "-m", "rlflow", f"run_dir={run_dir}", f"model.cache_dir={model_cache}", *SMALL,
            *overrides]


def env() -> dict:
    """The environment every command runs in: this checkout and tests/ importable, W&B logged out."""
    # COLUMNS: rich wraps at the width, which a pipe does not set (80); a message must not break mid-phrase
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "COLUMNS": "250"}
    e.pop("WANDB_API_KEY", None)
    return e


def rlflow(run_dir: Path, model_cache: str, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a small run to its end."""
    return subprocess.run(command(run_dir, model_cache, overrides), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def rlflow_eval(*args: str) -> subprocess.CompletedProcess:
    """``rlflow eval ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rlflow", "eval", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)


def eval_scores(checkpoint, *args: str) -> dict:
    """The reward and pass@k figures ``rlflow eval CHECKPOINT ARGS`` prints (its JSON line)."""
    r = rlflow_eval(str(checkpoint), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: v for k, v in figures.items() if k.startswith(("reward/", "pass@"))}


def said(r: subprocess.CompletedProcess) -> str:
    """What a command printed as one line of words (panel borders and line breaks dropped)."""
    return " ".join(re.sub("[│╭╮╰╯─┃┏┓┗┛━]", " ", r.stdout + r.stderr).split())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240, poll: float = 0.05) -> None:
    """Wait until the run ``proc`` is running has logged ``step`` steps; fails if it ends or takes ``timeout``."""
    log, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= step):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run never reached step {step} (exit code {proc.poll()}, {timeout:.0f}s bound)")
        time.sleep(poll)


def assert_all_processes_gone(run_dir: Path) -> None:
    """Every process the run's processes.json names (bus, roles, the local forkserver) has exited."""
    pids = json.loads((run_dir / "processes.json").read_text())
    named = [("bus", pids["bus"]), *pids["roles"].items()] + ([("forkserver", pids["forkserver"])]
                                                               if pids.get("forkserver") else [])
    for name, pid in named:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "?"
        pytest.fail(f"{name} (pid {pid}) is still there after the run, state {state}")


def wait_parked(client, gets: int, timeout: float = 10.0) -> None:
    """Wait until the bus holds ``gets`` parked (waiting) get requests."""
    deadline = time.monotonic() + timeout
    while len(client.stats()["waiting_gets"]) != gets:
        assert time.monotonic() < deadline, f"the bus never held {gets} parked gets: {client.stats()['waiting_gets']}"
        time.sleep(0.01)


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0
