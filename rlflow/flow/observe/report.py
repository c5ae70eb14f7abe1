"""``rlflow report RUN_DIR``: a run's story at a glance, from what it logged.

    rlflow report runs/X              write runs/X/report/ and print the capacity advice
    rlflow report runs/X --out DIR    write the report elsewhere
    rlflow report runs/X --json       print the advice as one JSON object
    rlflow report runs/X --steps 100:120   the trace of steps 100 to 120 only (a long run's is big)

Reads ``metrics.jsonl``, ``timeline.jsonl``, ``config.yaml``, ``summary.json`` and ``samples.jsonl``
(whichever exist: a run still going, or one that failed, gets a report of what it logged so far) and writes:
- the figures of ``flow/observe/plots.py`` (``overview.png`` has them all on one page);
- ``trace.json``: the timeline in Chrome's Trace Event Format, one track per role replica (open it in
  https://ui.perfetto.dev or chrome://tracing);
- ``advice.json``: the capacity model's inputs and advice (``flow/observe/capacity.py``);
- ``index.html``: the advice, the figures, the latest samples, and links to the rest.

A run writes its report itself when it ends (``tracking.report``) and prints the advice.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlflow.flow.observe.capacity import Advice, advise
from rlflow.flow.observe.timeline import chrome_trace, read_jsonl, read_timeline, step_ends, utilization


@dataclass
class RunLogs:
    """What a run directory holds, read once."""

    run_dir: Path
    metrics: list[dict]
    records: list[dict]  # timeline.jsonl
    config: dict
    summary: dict
    samples: list[dict] = field(default_factory=list)  # samples.jsonl
    evals: list[dict] = field(default_factory=list)  # eval.jsonl (periodic evaluation, eval.every)

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunLogs":
        run_dir = Path(run_dir)
        if not (run_dir / "metrics.jsonl").exists():
            raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl: is it a run directory (run_dir=... of a run)?")
        config = {}
        if (run_dir / "config.yaml").exists():
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        return cls(run_dir, read_jsonl(run_dir / "metrics.jsonl"), read_timeline(run_dir), config, summary,
                   read_jsonl(run_dir / "samples.jsonl"), read_jsonl(run_dir / "eval.jsonl"))

    def advice(self) -> Advice | None:
        if not self.config or self.no_advice() is not None:
            return None
        return advise(self.metrics, self.records, self.config, self.summary.get("cores"))

    def no_advice(self) -> str | None:
        """Why there is no capacity advice to give (None: there may be)."""
        if not self.config:
            return "the run directory has no config.yaml"
        if self.metrics and not any(m.get("step/updated", 1) for m in self.metrics):
            return ("no advice: the run trained nothing (no step had a sample to train), so there is no training "
                    "rate for the other roles to keep up with")
        return None

    def events(self) -> list[tuple[int, str]]:
        """(step, label) of each restart and rewind: the first step that ended after it."""
        ends = sorted((t, s) for s, t in step_ends(self.records).items())
        out = []
        for r in self.records:
            if r["kind"] == "instant":
                step = next((s for t, s in ends if t >= r["t"]), None)
                if step is not None:
                    out.append((step, f"{r['name']} {r['role']}-{r['replica']}"))
        return out


def render_figures(logs: RunLogs, out_dir: Path, advice: Advice | None) -> dict[str, Path]:
    """Draw and save every figure; returns name -> path."""
    from rlflow.flow.observe import plots

    figs = plots.figures(logs.metrics, utilization(logs.records, logs.metrics), logs.config, logs.events(),
                         logs.evals)
    paths = plots.save(figs, out_dir)
    last = logs.metrics[-1] if logs.metrics else {}
    title = (f"{logs.run_dir.name}   step {last.get('step', 0)}   {last.get('time', 0):.0f}s   "
             f"reward {last.get('reward/mean', float('nan')):.3f}   bottleneck: {advice.bottleneck if advice else 'unknown'}")
    paths["overview"] = plots.overview(paths, title, advice.lines if advice else [], out_dir / "overview.png")
    return paths


def draw_figures(run_dir: str | Path) -> dict[str, Path]:
    """The figures alone, into ``run_dir/report`` (for W&B while the run goes)."""
    logs = RunLogs.read(run_dir)
    return render_figures(logs, logs.run_dir / "report", logs.advice())


def draw_figures_niced(run_dir: str, parent: int) -> None:
    """A child process's drawing while the run goes: lowest CPU priority, gone if the launcher is."""
    import os

    from rlflow.transfer.lifetime import die_with_parent

    os.nice(19)
    die_with_parent(parent)
    draw_figures(run_dir)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 trace_steps: tuple[int, int] | None = None) -> tuple[Path, Advice | None, str | None]:
    """Write the report of ``run_dir`` (into ``run_dir/report`` unless ``out_dir``); returns (index.html,
    advice, why there is none). ``trace_steps``: (first, last) step of the trace (None: the whole run)."""
    logs = RunLogs.read(run_dir)
    out = Path(out_dir) if out_dir else logs.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    advice = logs.advice()
    paths = render_figures(logs, out, advice)
    (out / "trace.json").write_text(json.dumps(chrome_trace(logs.records, logs.metrics, trace_steps)))
    (out / "advice.json").write_text(json.dumps(_finite(advice.to_dict()) if advice else None, indent=1))
    index = out / "index.html"
    index.write_text(_html(logs, advice, paths))
    return index, advice, logs.no_advice()


def _finite(x):
    """JSON has no Infinity: a rate that could not be measured is null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _html(logs: RunLogs, advice: Advice | None, paths: dict[str, Path]) -> str:
    e = html.escape
    last = logs.metrics[-1] if logs.metrics else {}
    ledger = logs.summary.get("samples", {})
    facts = [f"steps logged: {len(logs.metrics)}", f"last step: {last.get('step', '-')}",
             f"time: {last.get('time', 0):.0f}s", f"reward (last step): {last.get('reward/mean', float('nan')):.3f}"]
    if ledger:
        facts.append(f"samples trained: {ledger.get('trained')} of {ledger.get('issued')} issued, "
                     f"{ledger.get('skipped', 0)} skipped (failed reward, no signal), "
                     f"{ledger.get('consumed_more_than_once', ledger.get('trained_more_than_once'))} more than once")
    advice_html = "".join(f"<li>{e(line)}</li>" for line in advice.lines) if advice else \
        f"<li>{e(logs.no_advice() or 'not enough steps or no timeline to measure')}</li>"
    overrides = " ".join(advice.overrides) if advice and advice.overrides else ""
    images = "".join(f'<h3>{e(name)}</h3><img src="{e(p.name)}" style="max-width:100%">' for name, p in paths.items()
                     if name != "overview")
    step = logs.samples[-1]["step"] if logs.samples else None
    rows = "".join(f"<tr><td>{s['step']}</td><td><pre>{e(s['prompt'])}</pre></td><td><pre>{e(s['response'])}</pre></td>"
                   f"<td>{s['reward'] if s['reward'] is not None else 'error'}</td><td>{s['staleness']}</td></tr>"
                   for s in logs.samples if s["step"] == step)
    samples = f"<h2>Samples of step {step}</h2><table border=1 cellpadding=4><tr><th>step</th><th>prompt</th>" \
              f"<th>response</th><th>reward</th><th>staleness</th></tr>{rows}</table>" if rows else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rlflow report: {e(logs.run_dir.name)}</title></head>
<body style="font-family:sans-serif;max-width:1400px;margin:auto">
<h1>{e(str(logs.run_dir))}</h1><p>{' &middot; '.join(e(f) for f in facts)}</p>
<h2>Capacity advice</h2><ul>{advice_html}</ul>
{f'<p>Follow it: <code>rlflow {e(overrides)}</code></p>' if overrides else ''}
<p>Timeline: <a href="trace.json">trace.json</a> (open it in <a href="https://ui.perfetto.dev">ui.perfetto.dev</a>
or chrome://tracing: one track per role replica, the bus queues and step metrics as counters).</p>
<img src="overview.png" style="max-width:100%">{images}{samples}
</body></html>
"""


def print_advice(console, advice: Advice | None, index: Path | None = None, why_none: str | None = None) -> None:
    """The advice in a panel; ``why_none``: what to say when there is no advice."""
    from rich.panel import Panel

    from rlflow.flow.observe.tracking import plain, say

    if advice is None:
        body = why_none or "not enough steps, or no timeline, to measure"
    else:
        body = "\n".join(advice.lines)
        if advice.overrides:
            body += f"\n\nTo follow it: {' '.join(advice.overrides)}"
    console.print(Panel(plain(body), title=plain(f"capacity (bottleneck: {advice.bottleneck if advice else 'unknown'})"),
                        border_style="cyan"))
    if index is not None:
        say(console, f"report: {index}")


def _step_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        lo, hi = int(first), int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected FIRST:LAST, two step numbers like 100:120") from None
    if not sep or lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected FIRST:LAST with 1 <= FIRST <= LAST")
    return lo, hi


def report_at_end(run_dir: str, console, tracker, step: int) -> None:
    """The end of a run: write its report, print the advice, send the figures and the advice to W&B."""
    from rlflow.flow.observe.tracking import report_pngs, say

    tracker.stop_drawing()  # a drawing still going would race the final one for the same files
    try:
        index, advice, why_none = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run's outcome is decided; the report is a by-product of it
        say(console, f"writing the report failed ({e!r}); `rlflow report {run_dir}` tries again", "warning")
        return
    print_advice(console, advice, index, why_none)
    tracker.final_figures(report_pngs(run_dir), step, advice.lines if advice else [])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlflow report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (run_dir=... of a run, finished or not)")
    parser.add_argument("--out", help="where to write the report (default RUN_DIR/report)")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON instead of text")
    parser.add_argument("--steps", metavar="FIRST:LAST", type=_step_range,
                        help="only these steps in trace.json (a long run's whole trace can be too big to open)")
    args = parser.parse_args(argv)
    from rlflow.flow.observe.tracking import make_console, say

    console = make_console()
    try:
        index, advice, why_none = write_report(args.run_dir, args.out, args.steps)
    except FileNotFoundError as e:
        say(console, str(e), "error")
        return 2
    if args.json:
        print(json.dumps(_finite(advice.to_dict()) if advice else None))
    else:
        print_advice(console, advice, index, why_none)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
