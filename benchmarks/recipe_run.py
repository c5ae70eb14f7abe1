"""Run the `rlflow` command as a user would, for benchmarks that compare whole runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_recipe(run_dir: Path, overrides: list[str], label: str) -> tuple[list[dict], dict, float]:
    """(metrics rows, summary.json, wall seconds) of one real run (W&B off); exits naming ``label`` on failure."""
    cmd = [sys.executable, "-m", "flow.cli", f"run_dir={run_dir}", "tracking.wandb=false", *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text()), wall
