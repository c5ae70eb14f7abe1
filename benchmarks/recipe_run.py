"""Run the `rlflow` command as a user would, for benchmarks that compare whole runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_recipe(run_dir: Path, overrides: list[str], label: str, report: bool = False) -> tuple[list[dict], dict, float]:
    """(metrics rows, summary.json, wall seconds) of one real run (W&B off); exits naming ``label`` on failure.

    A previous run in ``run_dir`` is removed first (a fresh run refuses a directory holding one).
    ``report``: let the run write run_dir/report at its end (off by default: it adds seconds to the wall)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlflow.flow.cli", f"run_dir={run_dir}", "tracking.wandb=false", f"tracking.report={report}",
           *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text()), wall


def run_stats(rows: list[dict], summary: dict, wall: float) -> dict:
    """The figures every whole-run benchmark reports: times, throughput, the trainer's wait, staleness, reward.

    ``steady_s`` runs from the first step's line to the last, so start-up (model load, cluster start)
    is in ``wall_s`` only; samples/s counts the samples of steps 2.. over that span.
    """
    window = max(1, len(rows) // 10)
    steady = rows[-1]["time"] - rows[0]["time"]
    wait = sum(r["actor/wait_s"] for r in rows)
    return {
        "steps": len(rows),
        "wall_s": round(wall, 2),
        "train_s": rows[-1]["time"],
        "steady_s": round(steady, 2),
        "samples_per_s": round(sum(r["samples"] for r in rows[1:]) / steady, 1) if steady > 0 else None,
        "trainer_wait_s": round(wait, 2),
        "trainer_wait_frac": round(wait / max(sum(r["actor/step_s"] for r in rows), 1e-9), 3),
        "trainer_compute_s": round(sum(r["actor/step_s"] for r in rows) - wait, 2),
        "rollout_busy_s": round(summary["busy_s"].get("rollout", 0.0), 2),
        "reward_busy_s": round(summary["busy_s"].get("reward", 0.0), 2),
        "staleness_max": max(r["staleness/max"] for r in rows),
        "staleness_mean": round(sum(r["staleness/mean"] for r in rows) / len(rows), 3),
        "reward_start": round(sum(r["reward/mean"] for r in rows[:window]) / window, 4),
        "reward_final": round(sum(r["reward/mean"] for r in rows[-window:]) / window, 4),
    }
