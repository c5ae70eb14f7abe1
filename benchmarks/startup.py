"""Start-up: seconds from launching ``rlflow`` to its first optimizer step, and to its end.

Each run launches the command as a user would and watches ``metrics.jsonl`` for its first line (the
first step's metrics are written the moment the launcher receives them), so the figure covers
everything a user waits for: imports, the model check, the bus, every role process and the first step.
With ``--baseline DIR`` (an older checkout of rlflow) the two are run alternately, so both see the same
machine load, and the JSON compares their medians.

    python -m benchmarks.startup --runs 5                         # the default recipe, 300 steps
    python -m benchmarks.startup --runs 5 --steps 20 --baseline ../rlflow-old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.02  # how often metrics.jsonl is looked at: the resolution of first_step_s
RUN_LIMIT_S = 1800.0  # bound on one run


def command(checkout: Path) -> list[str]:
    """How ``checkout`` is launched: ``python -m rlflow``, or ``python -m flow.cli`` before the rlflow package."""
    return [sys.executable, "-m", "flow.cli" if (checkout / "flow" / "cli.py").exists() else "rlflow"]


def one_run(checkout: Path, run_dir: Path, overrides: list[str]) -> dict:
    """first_step_s and wall_s of one run of ``checkout`` (W&B and the report off)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "WANDB_MODE": "disabled"}
    metrics = run_dir / "metrics.jsonl"
    t0 = time.monotonic()
    proc = subprocess.Popen([*command(checkout), f"run_dir={run_dir}", "tracking.wandb=false", "tracking.report=false",
                             *overrides], cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = None
    while proc.poll() is None and time.monotonic() - t0 < RUN_LIMIT_S:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.monotonic() - t0
        time.sleep(POLL_S)
    if proc.poll() is None:
        proc.kill()
        raise SystemExit(f"{checkout}: a run took more than {RUN_LIMIT_S:.0f}s")
    wall = time.monotonic() - t0
    out = proc.stdout.read()
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"{checkout} failed ({proc.returncode}):\n{out[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"first_step_s": round(first, 3), "wall_s": round(wall, 3), "steps": len(rows),
            "reward_final": round(sum(r["reward/mean"] for r in rows[-10:]) / len(rows[-10:]), 4)}


def medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in ("first_step_s", "wall_s", "reward_final")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each checkout (default 3)")
    ap.add_argument("--steps", type=int, default=300, help="flow.steps of each run (default 300: the default recipe)")
    ap.add_argument("--baseline", type=Path, help="an older checkout to compare with, run alternately")
    ap.add_argument("overrides", nargs="*", help="more settings for every run")
    args = ap.parse_args(argv)
    checkouts = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="rlflow-startup-") as tmp:
        for i in range(args.runs):
            for name, checkout in checkouts.items():
                r = one_run(checkout, Path(tmp) / name, [f"flow.steps={args.steps}", *args.overrides])
                runs[name].append(r)
                print(f"run {i + 1}/{args.runs} {name}: {json.dumps(r)}", flush=True)
    result = {"benchmark": "startup", "steps": args.steps, "runs": args.runs,
              **{name: {"median": medians(rs), "runs": rs} for name, rs in runs.items()}}
    if args.baseline:
        for k in ("first_step_s", "wall_s"):
            result[f"{k}_ratio"] = round(result["this"]["median"][k] / result["baseline"]["median"][k], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
