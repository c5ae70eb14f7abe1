"""What a failure costs: the default recipe with one process killed or frozen mid-run, against an undisturbed run.

    python -m benchmarks.fault_tolerance [--quick] [--steps N] [--at STEP]

Each case is a whole run of the `rlflow` command (seed 0, checkpoints every 10 steps, a KL term so a
reference replica runs too); at step ``--at`` one process gets a signal:

    kill-rollout / kill-reward / kill-reference : SIGKILL (restarted in place)
    freeze-rollout                              : SIGSTOP (found by its missing heartbeat, then restarted)
    kill-trainer                                : SIGKILL of the actor (restarted from its newest checkpoint)
    kill-launcher                               : SIGKILL of the launcher (everything dies), then resume=true

Reported per case: exit code, the ledger (every sample trained exactly once?), the recovery (restart
seconds until the new incarnation was ready, steps trained again), wall time against the undisturbed
run, and the mean reward of the steps after the failure against the undisturbed run's, with the
difference in standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"kill-rollout": ("rollout-0", signal.SIGKILL), "kill-reward": ("reward-0", signal.SIGKILL),
         "kill-reference": ("reference-0", signal.SIGKILL), "freeze-rollout": ("rollout-0", signal.SIGSTOP),
         "kill-trainer": ("actor-0", signal.SIGKILL), "kill-launcher": ("launcher", signal.SIGKILL)}


def run(run_dir: Path, overrides: list[str], victim: str | None, sig, at: int) -> dict:
    """One run; the signal goes to ``victim`` once ``at`` steps are logged. kill-launcher resumes after."""
    cmd = [sys.executable, "-m", "rlflow.flow.cli", f"run_dir={run_dir}", "tracking.wandb=false", "tracking.report=false", *overrides]
    t0 = time.monotonic()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while victim is not None and p.poll() is None:
            m = run_dir / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= at:
                pids = json.loads((run_dir / "processes.json").read_text())
                os.kill(pids["launcher"] if victim == "launcher" else pids["roles"][victim], sig)
                break
            time.sleep(0.05)
        p.wait()
        code = p.returncode
        if victim == "launcher":
            time.sleep(2)  # its roles and bus die with it
            code = subprocess.run(cmd + ["resume=true"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {"code": code, "wall_s": round(wall, 1), "rows": rows, "summary": summary}


def reward_after(rows: list[dict], at: int) -> tuple[float, float, int]:
    xs = [r["reward/mean"] for r in rows if r["step"] > at]
    if not xs:
        return math.nan, math.nan, 0
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return mean, var, len(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="40 steps, failure at step 13")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--at", type=int, default=25, help="the step at which the signal is sent")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    # Checkpoints every 10 steps; failing a few steps after one shows the steps a rewind trains again.
    steps, at = (40, 13) if args.quick else (args.steps, args.at)
    overrides = [f"flow.steps={steps}", "actor.kl_coef=0.01", "actor.checkpoint_every=10", "supervision.hang_s=5"]
    results, out = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        base = run(Path(tmp) / "undisturbed", overrides, None, None, at)
        b_mean, b_var, b_n = reward_after(base["rows"], at)
        results["undisturbed"] = {"code": base["code"], "wall_s": base["wall_s"], "reward_after": round(b_mean, 4)}
        for case in args.cases:
            victim, sig = CASES[case]
            r = run(Path(tmp) / case, overrides, victim, sig, at)
            mean, var, n = reward_after(r["rows"], at)
            se = math.sqrt(var / n + b_var / b_n) if n else math.nan
            sup = r["summary"].get("supervision", {}).get("restarts", [])
            ledger = r["summary"].get("samples", {})
            results[case] = {
                "code": r["code"], "steps_logged": [x["step"] for x in r["rows"]] == list(range(1, steps + 1)),
                "exactly_once": ledger.get("issued") == ledger.get("trained") and not ledger.get("consumed_more_than_once")
                and not ledger.get("issued_not_consumed"), "samples": ledger,
                "restarts": [{k: h.get(k) for k in ("replica", "what", "restart_s", "ready_s", "rewound_to", "steps_lost",
                                                     "rows_returned", "rows_cleared") if k in h} for h in sup],
                "wall_s": r["wall_s"], "wall_ratio": round(r["wall_s"] / base["wall_s"], 3),
                "reward_after": round(mean, 4), "reward_diff_se": round((mean - b_mean) / se, 2) if se > 0 else 0.0}
            print(f"{case}: {json.dumps(results[case])}", file=sys.stderr, flush=True)
    out = {"benchmark": "fault_tolerance", "steps": steps, "failure_at_step": at, "results": results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
