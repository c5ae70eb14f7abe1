"""Metrics out: ``run_dir/metrics.jsonl`` (always), Weights & Biases, and the console.

metrics.jsonl is a contract (docs/design.md, "Contracts"): one JSON object per optimizer step with at least
``step``, ``time`` (seconds since the run started), ``reward/mean``, ``staleness/max``, ``staleness/mean``.
Each line is flushed when written, so a run that fails keeps every step it finished. A run that
continues from a checkpoint at step N (``resume``, or a rewind after the trainer failed) first drops
the lines after N, so the file keeps one line per step of the lineage that survives; ``time`` goes on
from the last kept line.

W&B runs offline when no API key is configured (``tracking.wandb_mode=auto``), so a laptop or a CI
machine without network still gets a complete run directory to ``wandb sync`` later.

The console shows a live bar on a terminal (step, reward, staleness, samples/s, ETA) and a log line
every ``log_every`` steps otherwise (CI logs stay readable).

Figures and samples while the run goes: every ``figures_every`` steps the report's figures
(``flow/observe/plots.py``) are drawn from the run directory by a child process at the lowest CPU priority
(drawing takes seconds of CPU that training should have first, and a thread would hold the launcher's
GIL), at most one at a time (one still going when the next is due is not queued: the next shows
more anyway); they go to W&B at the next step after it finished. Every ``samples_every`` steps one
group of the step (prompt, responses, rewards) goes to ``samples.jsonl`` and a W&B table.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
import subprocess
from pathlib import Path

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.path.expanduser("~")) / ".netrc"
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


class Tracker:
    def __init__(self, cfg, run_dir: str, config: dict, total_steps: int, console: Console,
                 keep_steps: int | None = None):
        """``keep_steps``: a resumed run keeps the lines of steps up to this one and appends after them."""
        self.cfg, self.total, self.console, self.run_dir = cfg, total_steps, console, run_dir
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples = open(Path(run_dir) / "samples.jsonl", "a" if keep_steps is not None else "w", buffering=1)
        self.drawing: subprocess.Popen | None = None  # the process drawing figures for W&B (one at a time)
        self.figures_failed = False
        self.t0 = time.monotonic()
        self.jsonl = None
        self._reopen(keep_steps or 0)  # a fresh run keeps nothing (the launcher refuses a run_dir holding one)
        self.recent: deque[float] = deque(maxlen=10)  # the bar's reward: a mean over the last 10 steps
        self.run = None
        if cfg.wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # The run's W&B id is kept in run_dir, so a resumed run continues the same W&B run. Charts use
            # the logged "step" as x axis rather than W&B's own counter, which cannot go back on a rewind.
            id_file = Path(run_dir) / "wandb-id"
            run_id = id_file.read_text().strip() if keep_steps is not None and id_file.exists() else None
            self.run = wandb.init(project=cfg.project, name=cfg.name or Path(run_dir).name, dir=run_dir,
                                  config=config, mode=wandb_mode(cfg.wandb_mode), id=run_id,
                                  resume="allow" if run_id else None)
            id_file.write_text(self.run.id)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        self.progress = None
        if cfg.progress and console.is_terminal:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = self.progress.add_task("train", total=total_steps, info="waiting for the first step")
            self.progress.start()

    def log(self, metrics: dict) -> dict:
        record = {"step": metrics["step"], "time": round(time.monotonic() - self.t0, 3),
                  **{k: v for k, v in metrics.items() if k not in ("step", "kind", "role", "replica", "pid", "incarnation")}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.run is not None:
            # the histogram is a figure; eval/* went to W&B at its own step already (log_eval)
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not k.startswith("eval/")}
            numbers.update({f"{k}/{i}": x for k, v in record.items() if k.startswith("minibatch/") for i, x in enumerate(v)})
            self.run.log(numbers)
            self._send_figures(record["step"])
        if not math.isnan(record["reward/mean"]):
            self.recent.append(record["reward/mean"])
        info = (f"reward {sum(self.recent) / max(len(self.recent), 1):.3f}  staleness max {record['staleness/max']}"
                f" mean {record['staleness/mean']:.2f}  {record['samples/s']:.0f} samples/s")
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=info)
        elif record["step"] % self.cfg.log_every == 0 or record["step"] in (1, self.total):
            say(self.console, f"step {record['step']}/{self.total}  {info}  {record['time']:.0f}s")
        return record

    def log_eval(self, row: dict) -> None:
        """A periodic evaluation's figures (``flow/periodic_eval.py``: already in eval.jsonl) to W&B, at its step."""
        if self.run is not None:
            self.run.log(row)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """One group of step ``step``: dicts of prompt, response, reward, version, staleness."""
        for row in rows:
            self.samples.write(json.dumps({"step": step, **row}) + "\n")
        if self.run is not None:
            import wandb

            columns = ["step", "prompt", "response", "reward", "version", "staleness"]
            table = wandb.Table(columns=columns, data=[[step] + [r[c] for c in columns[1:]] for r in rows])
            self.run.log({"samples": table, "step": step})

    def _send_figures(self, step: int) -> None:
        """Send figures drawn since the last call to W&B; start the next drawing when it is due."""
        if self.drawing is not None and self.drawing.poll() is not None:
            drawn, self.drawing = self.drawing, None
            if drawn.returncode == 0:
                self._log_images(report_pngs(self.run_dir), step)
            else:  # figures are a by-product: a failure is said once and never stops the training
                self.figures_failed = True
                log = Path(self.run_dir) / "report" / "drawing.log"
                say(self.console, f"drawing the figures for W&B failed (exit {drawn.returncode}, see {log}); no more until "
                                  f"the end of the run", "warning")
        every = self.cfg.figures_every
        if every and step % every == 0 and step < self.total and self.drawing is None and not self.figures_failed:
            self.drawing = draw_in_background(self.run_dir)

    def _log_images(self, paths: dict, step: int) -> None:
        import wandb

        self.run.log({f"figures/{name}": wandb.Image(str(path)) for name, path in paths.items()} | {"step": step})

    def stop_drawing(self) -> None:
        """Stop a drawing still going (the final report is about to draw); its files are replaced whole,
        so none is left torn."""
        if self.drawing is not None:
            self.drawing.kill()
            self.drawing.wait()
            self.drawing = None

    def final_figures(self, paths: dict, step: int, advice: list[str]) -> None:
        """The report's figures and capacity advice at the end of the run (written by the launcher)."""
        if self.run is not None:
            self._log_images(paths, step)
            self.run.summary["capacity_advice"] = "\n".join(advice)

    def rewind(self, step: int) -> None:
        """Drop the lines after ``step``: the steps after it are about to be trained again."""
        self._reopen(step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def _reopen(self, keep: int | None) -> None:
        """(Re)open metrics.jsonl for appending; with ``keep``, first drop the lines of later steps
        (a fresh run truncates with keep=0); ``time`` then goes on from the last line kept."""
        if self.jsonl is not None:
            self.jsonl.close()
        offset = 0.0
        if keep is not None and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= keep]
            self.path.write_text("".join(line + "\n" for line in kept))
            offset = json.loads(kept[-1])["time"] if kept else 0.0
        self.t0 = time.monotonic() - offset
        self.jsonl = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.stop_drawing()
        self.jsonl.close()
        self.samples.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def draw_in_background(run_dir: str) -> subprocess.Popen:
    """Start a process drawing the report's figures of ``run_dir`` into run_dir/report, at nice 19."""
    import rlflow

    report = Path(run_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    root = str(Path(rlflow.__file__).resolve().parent.parent)  # where rlflow is importable from, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = f"from rlflow.flow.observe.report import draw_figures_niced; draw_figures_niced({str(run_dir)!r}, {os.getpid()})"
    with open(report / "drawing.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env)


def report_pngs(run_dir: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((Path(run_dir) / "report").glob("*.png"))}


class SyncTally:
    """The rollouts' weight-apply reports: those since the last step's line (its ``sync/*`` keys:
    ``take_step``) and, per replica, the totals summary.json keeps (``totals``)."""

    def __init__(self):
        self.since_step: list[dict] = []
        self.totals: dict[str, dict] = {}  # rollout-<i> -> applied, refused, bytes from the actor / from peers

    def add(self, ev: dict) -> None:
        self.since_step.append(ev)
        totals = self.totals.setdefault(f"rollout-{ev['replica']}", {"applied": 0, "refused": 0})
        totals["applied" if ev["bit_exact"] else "refused"] += 1
        totals.update(from_actor_bytes=ev["from_actor_bytes"], from_peers_bytes=ev["from_peers_bytes"],
                      version=ev.get("version", totals.get("version")))

    def take_step(self) -> dict:
        """The ``sync/*`` keys of the step line being written; the reports start again for the next one."""
        out = sync_summary(self.since_step)
        self.since_step = []
        return out


def sync_summary(reports: list[dict]) -> dict:
    """The ``sync/*`` keys the rollouts add to a step's line, from their weight-apply reports since the last.

    bit_exact: the fraction of applied objects whose checksum matched the actor's; transfer_s: the
    slowest replica's time from publication to having the newest version's bytes (dissemination).
    """
    if not reports:
        return {}
    applied = [r for r in reports if r["bit_exact"]]
    out = {"sync/bit_exact": len(applied) / len(reports), "sync/rejected": len(reports) - len(applied),
           "sync/fetch_wait_s": sum(r.get("fetch_wait_s", 0.0) for r in reports)}
    if applied:
        out["sync/apply_s"] = sum(r.get("apply_s", 0.0) for r in applied) / len(applied)
    transfers = [r["transfer_s"] for r in reports if "transfer_s" in r]
    if transfers:
        out["sync/transfer_s"] = max(transfers)
    return out


def make_console() -> Console:
    return Console(file=sys.stdout, stderr=False)


LABELS = {"error": "red", "warning": "yellow", "note": "cyan", "done": "green"}


def say(console: Console, text: str, label: str | None = None, style: str | None = None) -> None:
    """Print ``text`` as it is: rich reads no markup in it (a user's ``rlflow[ray]``, a path with brackets
    or a traceback keep every character), highlights nothing, and lets the terminal wrap long lines (a
    command or a path stays one line to copy). ``label``: a coloured prefix (``error: ...``, see
    ``LABELS``); ``style``: the colour of the whole text. Every message carrying user or program text goes
    through here (or through ``plain`` into a rich renderable)."""
    body = plain(text, style)
    if label is not None:
        body = Text.assemble((label, LABELS[label]), ": ", body)
    console.print(body, highlight=False, soft_wrap=True)


def plain(text: str, style: str | None = None) -> Text:
    """``text`` as a rich renderable that is never parsed for markup (for panels, tables and titles)."""
    return Text(str(text), style=style or "")
