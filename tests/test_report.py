"""The report of a real short run: every role (two rollout replicas, a reference), W&B offline.

One run serves the module: its end-of-run report, its trace, its advice, its samples and its W&B files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, env, metrics, rlflow

STEPS, K, EVERY = 16, 1, 4
REPLICAS = {"actor-0": "train", "rollout-0": "generate", "rollout-1": "generate", "reward-0": "score",
            "reference-0": "score"}  # every replica of the run, and the work it does
FIGURES = ["reward", "staleness", "offpolicy", "throughput", "sync", "utilization", "overview"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, model_cache):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    r = rlflow(run_dir, model_cache, f"flow.steps={STEPS}", f"flow.staleness={K}", "rollout.replicas=2",
               "actor.kl_coef=0.05", "tracking.wandb=true", "tracking.wandb_mode=offline", "tracking.report=true",
               f"tracking.samples_every={EVERY}", "tracking.figures_every=0")
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir, r.stdout


def test_report_files_exist_and_are_real_images(run):
    from PIL import Image

    report = run[0] / "report"
    for name in FIGURES:
        with Image.open(report / f"{name}.png") as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 150
            lo, hi = img.convert("L").getextrema()
            assert hi - lo > 100, f"{name}.png is blank"
    index = (report / "index.html").read_text()
    assert all(f'src="{name}.png"' in index for name in FIGURES) and 'href="trace.json"' in index


def test_figures_plot_the_logged_series(run):
    from rlflow.flow.observe import plots
    from rlflow.flow.observe.report import RunLogs
    from rlflow.flow.observe.timeline import utilization

    logs = RunLogs.read(run[0])
    rows = metrics(run[0])
    figs = plots.figures(logs.metrics, utilization(logs.records, logs.metrics), logs.config)
    lines = lambda fig, i=0: {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[i].get_lines()}  # noqa: E731
    assert lines(figs["reward"])["mean per step"] == pytest.approx([m["reward/mean"] for m in rows])
    bars = [p.get_height() for p in figs["staleness"].axes[0].patches]
    assert sum(bars) == sum(m["samples"] for m in rows) and len(bars) <= K + 1  # no sample beyond the bound
    assert lines(figs["staleness"], 1)["max"] == [m["staleness/max"] for m in rows]
    assert lines(figs["offpolicy"])["_ESS per step"] == pytest.approx([m["ess/ratio"] for m in rows])
    assert lines(figs["sync"])["sent (patch or compressed)"] == [m["sync/bytes"] for m in rows]
    assert lines(figs["sync"])["dense weights"] == [m["sync/dense_bytes"] for m in rows]
    assert [t.get_text() for t in figs["utilization"].axes[0].get_yticklabels()] == list(REPLICAS)[::-1]


def test_trace_parses_with_a_track_per_replica_doing_its_work(run):
    trace = json.loads((run[0] / "report" / "trace.json").read_text())
    events = trace["traceEvents"]
    pids = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert set(REPLICAS) <= set(tracks.values())
    spans = [e for e in events if e["ph"] == "X"]
    assert all(isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and e["dur"] >= 0 for e in spans)
    names: dict[str, set] = {}
    for e in spans:
        names.setdefault(tracks[(e["pid"], e["tid"])], set()).add(e["name"])
        assert pids[e["pid"]] == tracks[(e["pid"], e["tid"])].rsplit("-", 1)[0]
    for replica, work in REPLICAS.items():
        assert {work, "wait"} <= names[replica], (replica, names[replica])
    assert "sync" in names["actor-0"] and "sync" in names["rollout-0"]
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"bus ready rows", "bus leased rows", "reward", "staleness", "ess"} <= counters
    steps = {e["args"]["step"] for e in spans if e["name"] == "train" and e["args"].get("optimizer_step")}
    assert steps == set(range(1, STEPS + 1))


def test_every_replica_timeline_reaches_the_end_of_the_run(run):
    """Stopped roles send the spans of their last second (and the wait they were in) as they exit."""
    from rlflow.flow.observe.timeline import read_timeline, spans_by_replica

    by_replica = spans_by_replica(read_timeline(run[0]))
    end = max(s["t"] + s["d"] for s in by_replica["actor-0"])
    for replica in REPLICAS:
        last = max(s["t"] + s["d"] for s in by_replica[replica])
        assert last >= end - 0.5, f"{replica}'s timeline stops {end - last:.1f}s before the trainer's"
    assert any(s["args"].get("unfinished") for s in by_replica["reward-0"])


def test_capacity_advice_is_printed_at_the_end_and_written(run):
    run_dir, stdout = run
    advice = json.loads((run_dir / "report" / "advice.json").read_text())
    assert f"capacity (bottleneck: {advice['bottleneck']})" in stdout
    assert set(advice["stages"]) == {"rollout", "reward", "reference"}
    assert advice["stages"]["rollout"]["replicas"] == 2 and advice["batch"] == 16
    assert advice["demand"] > 0 and advice["staleness_min"] >= 1 and advice["staleness"] == K
    for s in advice["stages"].values():
        assert s["per_replica"] > 0 and 0 < s["busy_frac"] <= 1
    assert advice["lines"][0].startswith("The trainer takes") and "The trainer takes" in stdout


def test_samples_reach_samples_jsonl_and_a_wandb_table_every_n_steps(run):
    run_dir = run[0]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == list(range(EVERY, STEPS + 1, EVERY))
    for s in samples:
        assert s["prompt"] and isinstance(s["response"], str) and 0.0 <= s["reward"] <= 1.0
        assert 0 <= s["staleness"] <= K and s["version"] == s["step"] - 1 - s["staleness"]
    assert len(samples) == 4 * (STEPS // EVERY)  # one group of G=4 each time
    media = next((run_dir / "wandb").glob("offline-run-*")) / "files" / "media"
    assert len(list((media / "table").glob("samples_*.table.json"))) == STEPS // EVERY
    figures = {p.name.rsplit("_", 2)[0] for p in (media / "images" / "figures").glob("*.png")}
    assert figures == set(FIGURES)


def test_figures_reach_wandb_while_the_run_goes(run, tmp_path):
    """The tracker's figures path on the run's own logs: drawn in a child process, then sent at a later step."""
    from rlflow.flow.config import TrackingConfig
    from rlflow.flow.observe.tracking import Tracker, make_console

    run_dir = tmp_path / "again"
    run_dir.mkdir()
    for name in ("config.yaml", "timeline.jsonl"):
        shutil.copy(run[0] / name, run_dir / name)
    cfg = TrackingConfig(wandb=True, wandb_mode="offline", progress=False, figures_every=4)
    tracker = Tracker(cfg, str(run_dir), {}, STEPS, make_console())
    rows = metrics(run[0])
    for m in rows[:4]:
        tracker.log(m)
    assert tracker.drawing is not None  # due at step 4
    assert tracker.drawing.wait(120) == 0, (run_dir / "report" / "drawing.log").read_text()
    tracker.log(rows[4])  # the finished drawing goes out with step 5
    tracker.close()
    media = next((run_dir / "wandb").glob("offline-run-*")) / "files" / "media" / "images" / "figures"
    assert {p.name.rsplit("_", 2)[0] for p in media.glob("*.png")} == set(FIGURES)


def test_report_command_writes_elsewhere_and_prints_json(run, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "report", str(run[0]), "--out", str(out), "--json"], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["bottleneck"] == json.loads(
        (run[0] / "report" / "advice.json").read_text())["bottleneck"]
    assert all((out / f"{name}.png").exists() for name in FIGURES) and (out / "trace.json").exists()
    missing = subprocess.run([sys.executable, "-m", "rlflow.flow.cli", "report", str(tmp_path / "nothing")], cwd=REPO,
                             env=env(), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "holds no metrics.jsonl" in missing.stdout


def test_the_reward_figure_draws_each_data_source_and_each_held_out_evaluation():
    from rlflow.flow.observe import plots

    metrics = [{"step": s, "reward/mean": 0.1 * s, "reward/std": 0.0, "source/math/reward_mean": 0.2,
                "source/rev/reward_mean": 0.01 * s} for s in range(1, 5)]
    evals = [{"step": 2, "eval/reward/mean": 0.3, "eval/reward/mean_ci95": 0.05, "eval/pass@1": 0.1},
             {"step": 4, "eval/reward/mean": 0.4, "eval/reward/mean_ci95": 0.04, "eval/pass@1": 0.2}]
    fig = plots.figures(metrics, {}, {}, evals=evals)["reward"]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in fig.axes[0].get_lines()}
    assert lines["source math, rolling 10 steps"] == pytest.approx([0.2] * 4)
    assert lines["source rev, rolling 10 steps"] == pytest.approx([0.01, 0.015, 0.02, 0.025])
    assert lines["held-out eval: pass@1"] == pytest.approx([0.1, 0.2])
    assert any(ln.get_label() == "held-out eval: mean reward, 95% interval" for ln in fig.axes[0].containers)
