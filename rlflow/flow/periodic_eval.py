"""Periodic evaluation during a run (``eval.every``): every so many steps, the step's checkpoint is scored
on held-out prompts by ``rlflow eval`` in a process of its own (the eval replica).

Design decisions:
- The same evaluation as the command (``flow/evaluate.py``): the run's task or ``eval.data``, its reward
  and sampling, pass@1, pass@``eval.samples`` and the mean reward with 95% intervals; a user can re-run
  any of them by hand on the same checkpoint and get the same numbers.
- A process, not a rollout replica's time: generation for training never waits for an evaluation, and
  an evaluation that fails (out of memory, a bad eval file) costs only itself: it is said, and training
  goes on. It runs at a lower CPU priority, one at a time; steps due meanwhile wait their turn (a
  bounded queue: past ``MAX_QUEUED`` the oldest is dropped and said, so a slow evaluation never piles up).
- Checkpoints: step s is scored on ``checkpoints/step-s`` (so ``eval.every`` is a multiple of
  ``actor.checkpoint_every``), the last step on ``checkpoints/final``. A checkpoint directory is only
  renamed into place once whole; the moment it appears (polled with the launcher's events), it is
  linked file by file into ``RUN_DIR/eval/step-s.ckpt`` (hard links: no copy), so ``actor.checkpoint_keep``
  pruning it while its evaluation waits or runs takes nothing from the evaluation; the links go when it
  is done. A step whose checkpoint is gone (pruned before it was seen) is dropped and said.
- Where results go: ``RUN_DIR/eval.jsonl`` (one line per evaluated step), W&B at that step, the next
  line of metrics.jsonl (``eval/*`` with ``eval/step``: a line per step stays a line per step), the
  report's reward figure, and summary.json (the last one). The run waits for the last step's
  evaluation (bounded) before it ends.
- A rewind drops the evaluations of the steps it discards (a running one is killed), their lines in
  eval.jsonl, and results not yet written to metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable

MAX_QUEUED = 4  # evaluations waiting for the one running; more means they take longer than the steps between them


class PeriodicEval:
    def __init__(self, cfg, run_dir: str, say: Callable[[str, str | None], None]):
        """``cfg``: the RunConfig; ``say(text, label)`` tells the user (the launcher's console)."""
        self.cfg, self.run_dir, self.say = cfg, Path(run_dir), say
        self.queue: deque[int] = deque()  # steps due, oldest first
        self.linked: set[int] = set()  # queued steps whose checkpoint is linked into eval/ already
        self.running: tuple[int, subprocess.Popen] | None = None  # (step, its evaluation's process)
        self.waiting_since: float | None = None  # the head of the queue's checkpoint not there yet since
        self.pending: dict = {}  # the newest results not yet written into a metrics.jsonl line
        self.last: dict | None = None
        (self.run_dir / "eval").mkdir(exist_ok=True)

    def due(self, step: int) -> None:
        """A step's metrics arrived: queue its evaluation if ``eval.every`` says so (and always the last)."""
        every, steps = self.cfg.eval.every, self.cfg.flow.steps
        if step % every and step != steps:
            return
        if len(self.queue) == MAX_QUEUED:
            dropped = self.queue.popleft()
            self.say(f"eval: step {dropped} not evaluated, {MAX_QUEUED} later steps were waiting (an evaluation "
                     f"takes longer than eval.every={every} steps: raise it, or lower eval.prompts)", "warning")
        self.queue.append(step)

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / ("final" if step == self.cfg.flow.steps else f"step-{step}")

    def linked_checkpoint(self, step: int) -> Path:
        """Where step ``step``'s checkpoint is linked for its evaluation: beside eval.jsonl's, two levels
        below the run directory like the original, so ``rlflow eval`` finds the run's config.yaml."""
        return self.run_dir / "eval" / f"step-{step}.ckpt"

    def poll(self) -> list[dict]:
        """Link each queued checkpoint that appeared, collect a finished evaluation and start the next;
        returns the results collected (each ``{"step": s, "eval/...": ...}``), already in eval.jsonl."""
        out = []
        for step in list(self.queue):
            if step not in self.linked and self.checkpoint(step).is_dir():
                self._link(step)
            elif step not in self.linked and self._pruned(step):
                self.queue.remove(step)
                self.say(f"eval: {self.checkpoint(step)} was removed (actor.checkpoint_keep) before it was seen; "
                         f"step {step} not evaluated", "warning")
        if self.running is not None and self.running[1].poll() is not None:
            out += self._collect()
        if self.running is None and self.queue:
            step = self.queue[0]
            if step in self.linked:
                self.queue.popleft()
                self.waiting_since = None
                self.running = (step, self._start(step))
            elif self.waiting_since is None:
                self.waiting_since = time.monotonic()
            elif time.monotonic() - self.waiting_since > self.cfg.flow.wait_seconds:
                self.queue.popleft()
                self.waiting_since = None
                self.say(f"eval: {self.checkpoint(step)} did not appear within flow.wait_seconds; step {step} not "
                         f"evaluated", "warning")
        return out

    def _link(self, step: int) -> None:
        """Hard-link the checkpoint's files into eval/ (copied where the filesystem has no hard links)."""
        target = self.linked_checkpoint(step)
        shutil.rmtree(target, ignore_errors=True)
        try:
            shutil.copytree(self.checkpoint(step), target, copy_function=os.link)
        except OSError:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.checkpoint(step), target)
        self.linked.add(step)

    def _pruned(self, step: int) -> bool:
        """Whether a later checkpoint exists while this step's does not: it was written and pruned unseen."""
        later = [int(p.name[5:]) for p in (self.run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
        return step != self.cfg.flow.steps and any(s > step for s in later)

    def finish(self, timeout: float) -> list[dict]:
        """Wait (up to ``timeout``) for the queued and running evaluations; returns their results."""
        out, deadline = [], time.monotonic() + timeout
        while (self.queue or self.running is not None) and time.monotonic() < deadline:
            out += self.poll()
            time.sleep(0.05)
        if self.queue or self.running is not None:
            self.say(f"eval: stopped waiting after {timeout:.0f}s; steps {sorted(self.queue)} not evaluated", "warning")
        return out

    def rewind(self, step: int) -> None:
        """Drop the evaluations of steps after ``step`` (a rewind trains them again): queued, running, their
        lines in eval.jsonl, and results not yet in a metrics.jsonl line."""
        self.queue = deque(s for s in self.queue if s <= step)
        if self.running is not None and self.running[0] > step:
            self.close()
        for s in [s for s in self.linked if s > step]:
            self.linked.discard(s)
            shutil.rmtree(self.linked_checkpoint(s), ignore_errors=True)
        lines = self.run_dir / "eval.jsonl"
        if lines.exists():
            kept = [line for line in lines.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            lines.write_text("".join(line + "\n" for line in kept))
            self.last = json.loads(kept[-1]) if kept else None
        if self.pending.get("eval/step", 0) > step:
            self.pending = {}

    def close(self) -> None:
        if self.running is not None:
            self.running[1].kill()
            self.running[1].wait()
            self.running = None

    def take_pending(self) -> dict:
        """The newest results not yet in a metrics.jsonl line (``eval/*`` and ``eval/step``), once."""
        out, self.pending = self.pending, {}
        return out

    def _start(self, step: int) -> subprocess.Popen:
        import rlflow

        e = self.cfg.eval
        args = ["eval", str(self.linked_checkpoint(step)), "--out", str(self._out(step)), "--samples",
                str(e.samples), "--prompts", str(e.prompts), "--seed", str(e.seed), "--device", e.device]
        if e.data is not None:
            args += ["--data", e.data, "--split", e.split]
        root = str(Path(rlflow.__file__).resolve().parent.parent)  # where rlflow is importable from, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        code = "import os, runpy, sys; os.nice(10); sys.argv = ['rlflow', *sys.argv[1:]]; " \
               "runpy.run_module('rlflow', run_name='__main__', alter_sys=True)"  # niced: training comes first
        with open(self.run_dir / "eval" / f"step-{step}.log", "w") as log:
            return subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT, env=env)

    def _out(self, step: int) -> Path:
        return self.run_dir / "eval" / f"step-{step}.json"

    def _collect(self) -> list[dict]:
        step, proc = self.running
        self.running = None
        self.linked.discard(step)
        shutil.rmtree(self.linked_checkpoint(step), ignore_errors=True)
        if proc.returncode != 0 or not self._out(step).exists():
            self.say(f"eval of step {step} failed (exit {proc.returncode}): see {self.run_dir}/eval/step-{step}.log; "
                     f"training goes on", "warning")
            return []
        figures = json.loads(self._out(step).read_text())
        row = {"step": step, **{f"eval/{k}": v for k, v in figures.items()
                                if k.startswith(("pass@", "reward/")) and isinstance(v, (int, float))}}
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = row
        self.pending = {**{k: v for k, v in row.items() if k != "step"}, "eval/step": step}
        shown = ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/") and "ci95" not in k)
        self.say(f"eval at step {step}: {shown}", None)
        return [row]
