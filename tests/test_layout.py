"""The package layering (docs/design.md, "Layers and imports"): imports only point down, and the bus
knows nothing of RL or torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rlflow"
LAYERS = ["transfer", "envs", "tasks", "algo", "sync", "engines", "train", "roles", "flow"]  # lowest first
IMPORT = re.compile(r"^\s*(?:from|import) rlflow\.(\w+)", re.M)


def test_every_import_between_packages_points_down_the_layers():
    rank = {p: i for i, p in enumerate(LAYERS)}
    assert sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()) == sorted(LAYERS + ["recipes"])
    upward = [(str(f.relative_to(ROOT)), target) for f in ROOT.rglob("*.py") if f.parent != ROOT
              for target in IMPORT.findall(f.read_text())
              if target in rank and rank[target] > rank[f.relative_to(ROOT).parts[0]]]
    assert upward == []


def test_the_bus_imports_neither_the_rest_of_rlflow_nor_torch():
    code = ("import sys, rlflow.transfer, rlflow.transfer.cli, rlflow.transfer.relay, rlflow.transfer.demo; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('rlflow.') and m.count('.')}), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("]")
    assert out[0] + "]" == "['transfer']" and out[1].strip() == "False"


def test_the_launcher_and_every_config_import_no_torch():
    # The launcher checks a run, plans it and feeds it without torch, so the roles' forkserver has a
    # core to itself while it imports torch (the start-up path; benchmarks/startup.py measures it).
    code = ("import sys, rlflow.flow.cli, rlflow.flow.launcher, rlflow.flow.doctor, rlflow.roles.config, "
            "rlflow.sync.config, rlflow.engines.config, rlflow.engines.tiny, rlflow.algo.choices; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
